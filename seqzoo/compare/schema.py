"""The sweep file: which model recipes, on which task, under which (shared) training spec.

    name: mqar
    task: {type: mqar, seq_len: 64, num_kv_pairs: 8, vocab_size: 64}   # replaces each recipe's task
    train: {steps: 300, batch_size: 32, lr: 3.0e-3, warmup_steps: 30}  # replaces each recipe's train
    lrs: [1.0e-3, 3.0e-3]            # optional: train each model at each, keep the best (by seed mean)
    seeds: [0, 1, 2]                 # optional: every model once per seed (init and batch order of the
                                     # model; the task's data stay the same); mean ± std reported
    model: {n_layers: 2}             # optional: overrides merged into every model
    eval_seq_lens: [64, 128, 256]    # the headline metric against test sequence length
    models:
      - recipes/tiny-attention.yaml                      # a model recipe, by path
      - {recipe: recipes/tiny-gla.yaml, name: gla-wide, model: {d_model: 96}}
    smoke: {steps: 3}                # what `--smoke` shrinks the run to (one seed, one lr)
    claims:                          # published results the report checks (``seqzoo.compare.claims``)
      - {kind: threshold, claim: "attention solves MQAR", source: "Arora et al. 2023, fig. 2",
         models: ["attention*"], at_least: 0.99}

Only the model section of each recipe is used (plus the sweep's and the entry's ``model``
overrides, in that order); task
and training come from the sweep, so every model sees identical data and schedule. The
model's vocabulary is the task's, unless an entry overrides ``model.vocab_size``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Sequence

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from seqzoo.errors import RecipeError
from seqzoo.limits import MAX_BATCH, MAX_EVAL_BATCHES, MAX_LR, MAX_SEQ_LEN, MAX_STEPS
from seqzoo.recipes import NAME_PATTERN, TrainSpec, _pydantic_error
from seqzoo.safe_yaml import load_yaml_file
from seqzoo.strict_schema import STRICT
from seqzoo.compare.claims import Claim

SeqLen = Annotated[int, Field(ge=1, le=MAX_SEQ_LEN)]
LearningRate = Annotated[float, Field(gt=0, le=MAX_LR)]
MAX_MODELS = 256  # entries of one sweep
MAX_LIST = 64     # learning rates, seeds or test lengths of one sweep
MAX_SEED = 2**31 - 1
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


class _Strict(BaseModel):
    model_config = STRICT


class ModelEntry(_Strict):
    recipe: str = Field(description="model recipe path (relative to the working directory or the sweep file)")
    name: str | None = Field(None, pattern=NAME_PATTERN, description="label in the report (and run directory); "
                             "default: the recipe's name")
    model: dict[str, Any] = Field(default_factory=dict, description="overrides merged into the recipe's model")


class SmokeSpec(_Strict):
    """What ``--smoke`` changes: a few steps on small batches, one eval batch, two lengths."""

    steps: int = Field(3, ge=1, le=MAX_STEPS)
    batch_size: int = Field(4, ge=1, le=MAX_BATCH)
    eval_batches: int = Field(1, ge=1, le=MAX_EVAL_BATCHES)
    eval_batch_size: int = Field(4, ge=1, le=MAX_BATCH)
    lrs: int = Field(1, ge=1, le=MAX_LIST, description="how many of the sweep's learning rates to keep")
    seeds: int = Field(1, ge=1, le=MAX_LIST, description="how many of the sweep's seeds to keep")
    task: dict[str, Any] = Field(default_factory=dict, description="task overrides, e.g. a shorter seq_len")
    eval_seq_lens: list[SeqLen] | None = Field(None, min_length=1, max_length=MAX_LIST,
                                               description="default: the first two of the sweep's")


class Sweep(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    task: dict[str, Any] = Field(description="the task every model trains on (type + settings)")
    train: TrainSpec = Field(default_factory=TrainSpec, description="the training spec every model shares")
    lrs: list[LearningRate] | None = Field(None, min_length=1, max_length=MAX_LIST,
                                           description="learning-rate sweep (best final metric kept)")
    seeds: list[Seed] | None = Field(None, min_length=1, max_length=MAX_LIST,
                                     description="train every model once per seed (default: train.seed only)")
    models: list[ModelEntry] = Field(min_length=1, max_length=MAX_MODELS)
    model: dict[str, Any] = Field(default_factory=dict,
                                  description="overrides merged into every model (e.g. a common width and depth)")
    eval_seq_lens: list[SeqLen] = Field(default_factory=list, max_length=MAX_LIST,
                                        description="default: the task's seq_len")
    eval_batches: int = Field(8, ge=1, le=MAX_EVAL_BATCHES, description="batches per length in the length evaluation")
    smoke: SmokeSpec = Field(default_factory=SmokeSpec)
    claims: list[Claim] = Field(default_factory=list, max_length=MAX_MODELS,
                                description="published results checked against the measurements")

    @field_validator("models", mode="before")
    @classmethod
    def _paths_as_entries(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"recipe": v} if isinstance(v, str) else v for v in value]
        return value

    @model_validator(mode="after")
    def _unique_labels(self) -> "Sweep":
        labels = [m.name for m in self.models if m.name]
        if len(labels) != len(set(labels)):
            raise ValueError(f"model names must be unique, got {labels}")
        if self.seeds is not None and len(self.seeds) != len(set(self.seeds)):
            raise ValueError(f"seeds must be distinct, got {self.seeds}")
        return self


def load_sweep(path: str | Path, *, overrides: Sequence[str] = ()) -> Sweep:
    """Read and validate a sweep file after the command-line ``overrides`` (``KEY=VALUE``)."""
    from seqzoo.overrides import load_with_overrides

    p = Path(path)
    data = load_yaml_file(p, what="sweep file")
    if not isinstance(data, dict):
        raise RecipeError(str(p), "", "expected a mapping at the top level")

    def validate(d: dict[str, Any]) -> Sweep:
        try:
            return Sweep.model_validate(d)
        except ValidationError as err:
            raise _pydantic_error(str(p), err) from None

    return load_with_overrides(data, overrides, path=str(p), validate=validate)
