"""The sweep file: which model recipes, on which task, under which (shared) training spec.

    name: mqar
    task: {type: mqar, seq_len: 64, num_kv_pairs: 8, vocab_size: 64}   # replaces each recipe's task
    train: {steps: 300, batch_size: 32, lr: 3.0e-3, warmup_steps: 30}  # replaces each recipe's train
    lrs: [1.0e-3, 3.0e-3]            # optional: train each model at each, keep the best
    model: {n_layers: 2}             # optional: overrides merged into every model
    eval_seq_lens: [64, 128, 256]    # the headline metric against test sequence length
    models:
      - recipes/tiny-attention.yaml                      # a model recipe, by path
      - {recipe: recipes/tiny-gla.yaml, name: gla-wide, model: {d_model: 96}}
    smoke: {steps: 3}                # what `--smoke` shrinks the run to

Only the model section of each recipe is used (plus the sweep's and the entry's ``model``
overrides, in that order); task
and training come from the sweep, so every model sees identical data and schedule. The
model's vocabulary is the task's, unless an entry overrides ``model.vocab_size``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from seqzoo.errors import RecipeError
from seqzoo.recipes import TrainSpec, _pydantic_error


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelEntry(_Strict):
    recipe: str = Field(description="model recipe path (relative to the working directory or the sweep file)")
    name: str | None = Field(None, description="label in the report; default: the recipe's name")
    model: dict[str, Any] = Field(default_factory=dict, description="overrides merged into the recipe's model")


class SmokeSpec(_Strict):
    """What ``--smoke`` changes: a few steps on small batches, one eval batch, two lengths."""

    steps: int = Field(3, ge=1)
    batch_size: int = Field(4, ge=1)
    eval_batches: int = Field(1, ge=1)
    eval_batch_size: int = Field(4, ge=1)
    lrs: int = Field(1, ge=1, description="how many of the sweep's learning rates to keep")
    task: dict[str, Any] = Field(default_factory=dict, description="task overrides, e.g. a shorter seq_len")
    eval_seq_lens: list[int] | None = Field(None, description="default: the first two of the sweep's")


class Sweep(_Strict):
    name: str
    description: str = ""
    task: dict[str, Any] = Field(description="the task every model trains on (type + settings)")
    train: TrainSpec = Field(default_factory=TrainSpec, description="the training spec every model shares")
    lrs: list[float] | None = Field(None, min_length=1, description="learning-rate sweep (best final metric kept)")
    models: list[ModelEntry] = Field(min_length=1)
    model: dict[str, Any] = Field(default_factory=dict,
                                  description="overrides merged into every model (e.g. a common width and depth)")
    eval_seq_lens: list[int] = Field(default_factory=list, description="default: the task's seq_len")
    eval_batches: int = Field(8, ge=1, description="batches per length in the length evaluation")
    smoke: SmokeSpec = Field(default_factory=SmokeSpec)

    @field_validator("models", mode="before")
    @classmethod
    def _paths_as_entries(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"recipe": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("lrs")
    @classmethod
    def _positive(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and any(lr <= 0 for lr in value):
            raise ValueError(f"learning rates must be positive, got {value}")
        return value

    @field_validator("eval_seq_lens")
    @classmethod
    def _lengths(cls, value: list[int]) -> list[int]:
        if any(n < 1 for n in value):
            raise ValueError(f"sequence lengths must be positive, got {value}")
        return value

    @model_validator(mode="after")
    def _unique_labels(self) -> "Sweep":
        labels = [m.name for m in self.models if m.name]
        if len(labels) != len(set(labels)):
            raise ValueError(f"model names must be unique, got {labels}")
        return self


def load_sweep(path: str | Path, *, overrides: Sequence[str] = ()) -> Sweep:
    """Read and validate a sweep file after the command-line ``overrides`` (``KEY=VALUE``)."""
    from seqzoo.overrides import load_with_overrides

    p = Path(path)
    if not p.exists():
        raise RecipeError(str(p), "", "no such sweep file")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(str(p), "", f"not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise RecipeError(str(p), "", "expected a mapping at the top level")

    def validate(d: dict[str, Any]) -> Sweep:
        try:
            return Sweep(**d)
        except ValidationError as err:
            raise _pydantic_error(str(p), err) from None

    return load_with_overrides(data, overrides, path=str(p), validate=validate)
