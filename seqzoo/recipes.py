"""Recipes: one YAML file describes a model, its task and its training, validated strictly
before anything runs. Loading a recipe never executes code: plain YAML (safe_load), names
looked up in registries, no dotted import paths.

    name: tiny-attention
    model:
      d_model: 128
      n_layers: 4
      mixers:                      # named mixer entries: `type` + the mixer's own settings
        attn: {type: attention, n_heads: 4}
      pattern: [attn]              # tiled to n_layers (or `layers:` an explicit list)
    task: {type: bytes, seq_len: 256}
    train: {steps: 600, batch_size: 16, lr: 3.0e-3}
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from seqzoo.errors import RecipeError
from seqzoo.limits import (MAX_BATCH, MAX_EVAL_BATCHES, MAX_EXPANSION, MAX_LAYERS, MAX_LR, MAX_NEW_TOKENS, MAX_SEED,
                           MAX_STEPS, MAX_VOCAB, MAX_WIDTH)
from seqzoo.mixers.base import ConfigError, MixerConfig, make_config
from seqzoo.safe_yaml import load_yaml_file
from seqzoo.strict_schema import STRICT, first_error

# A recipe's name is the default run directory (runs/<name>): a plain file name.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$"
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:[0-9]{1,3})?)$")


class _Strict(BaseModel):
    model_config = STRICT


class ModelSpec(_Strict):
    vocab_size: int | None = Field(None, ge=2, le=MAX_VOCAB, description="default: the task's vocabulary")
    d_model: int = Field(128, ge=1, le=MAX_WIDTH)
    n_layers: int = Field(4, ge=1, le=MAX_LAYERS)
    mixers: dict[str, dict[str, Any]] = Field(default_factory=lambda: {"attn": {"type": "attention"}})
    pattern: list[str] | None = Field(None, min_length=1, max_length=MAX_LAYERS)
    layers: list[str] | None = Field(None, min_length=1, max_length=MAX_LAYERS)
    mlp: Literal["swiglu", "none"] = "swiglu"
    mlp_ratio: float = Field(4.0, gt=0, le=MAX_EXPANSION)
    norm_eps: float = Field(1e-6, gt=0)
    tie_embeddings: bool = True
    init_std: float = Field(0.02, gt=0)

    @model_validator(mode="after")
    def _one_layout(self) -> "ModelSpec":
        if self.pattern is not None and self.layers is not None:
            raise ValueError("give either `pattern` (tiled to n_layers) or `layers` (explicit), not both")
        return self

    def layer_names(self) -> list[str]:
        """The mixer entry of every layer, after tiling the pattern to n_layers."""
        if self.layers is not None:
            return list(self.layers)
        pattern = self.pattern or list(self.mixers)[:1]
        if not pattern:  # no mixer at all: validate_all names the key
            return []
        return [pattern[i % len(pattern)] for i in range(self.n_layers)]


class TrainSpec(_Strict):
    steps: int = Field(600, ge=1, le=MAX_STEPS)
    batch_size: int = Field(16, ge=1, le=MAX_BATCH, description="global batch (sequences per optimiser step)")
    grad_accum: int = Field(1, ge=1, le=MAX_BATCH)
    lr: float = Field(3e-3, gt=0, le=MAX_LR)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(50, ge=0, le=MAX_STEPS)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.9, 0.95), strict=False)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    eval_every: int = Field(100, ge=1, le=MAX_STEPS)
    eval_batches: int = Field(8, ge=1, le=MAX_EVAL_BATCHES)
    eval_batch_size: int | None = Field(None, ge=1, le=MAX_BATCH)
    ckpt_every: int = Field(200, ge=1, le=MAX_STEPS)
    log_every: int = Field(10, ge=1, le=MAX_STEPS)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    sample_tokens: int = Field(200, ge=0, le=MAX_NEW_TOKENS, description="tokens generated at the end (text tasks)")
    log: list[Literal["jsonl", "tensorboard", "wandb"]] = Field(
        default_factory=lambda: ["jsonl"], description="metrics sinks; JSONL is always written")
    compile: bool = Field(False, description="torch.compile the model (inductor); kernels stay opaque custom ops")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not DEVICE_PATTERN.match(value):
            raise ValueError(f"expected auto, cpu, cuda, cuda:N or mps, got {value!r}")
        return value

    @model_validator(mode="after")
    def _accum_divides(self) -> "TrainSpec":
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size={self.batch_size} must be divisible by grad_accum={self.grad_accum}")
        return self


class Recipe(_Strict):
    name: str = Field("unnamed", pattern=NAME_PATTERN,
                      description="letters, digits and . _ + - (it names the run directory)")
    description: str = ""
    model: ModelSpec = Field(default_factory=ModelSpec)
    task: dict[str, Any] = Field(default_factory=lambda: {"type": "bytes"})
    train: TrainSpec = Field(default_factory=TrainSpec)

    def mixer_configs(self) -> dict[str, tuple[str, MixerConfig]]:
        """entry name -> (mixer type, validated config). Raises ConfigError naming the key."""
        out = {}
        for entry, spec in self.model.mixers.items():
            if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
                raise ConfigError(f"model.mixers.{entry}.type", "each mixer entry needs a `type` (a registered mixer name)")
            params = {k: v for k, v in spec.items() if k != "type"}
            try:
                out[entry] = (spec["type"], make_config(spec["type"], params, d_model=self.model.d_model))
            except ConfigError as err:
                raise ConfigError(f"model.mixers.{entry}.{err.key}", err.message) from None
        return out

    def validate_all(self) -> "Recipe":
        """Everything that needs the registries: mixer settings, layer names, task settings."""
        from seqzoo.tasks import build_task

        configs = self.mixer_configs()
        key = "model.layers" if self.model.layers is not None else "model.pattern"
        names = self.model.layer_names()
        if not names:
            raise ConfigError(key, "expected at least one mixer entry")
        for i, name in enumerate(names):
            if name not in configs:
                raise ConfigError(f"{key}[{i}]", f"{name!r} is not an entry of model.mixers; expected one of {sorted(configs)}")
        if self.model.layers is not None and len(names) != self.model.n_layers:
            raise ConfigError("model.layers", f"lists {len(names)} layers but n_layers={self.model.n_layers}")
        try:
            task = build_task(self.task)
        except ConfigError as err:
            raise ConfigError(f"task.{err.key}", err.message) from None
        if self.model.vocab_size is not None and self.model.vocab_size < task.vocab_size:
            raise ConfigError("model.vocab_size", f"the task needs at least {task.vocab_size}, got {self.model.vocab_size}")
        return self

    def vocab_size(self) -> int:
        from seqzoo.tasks import build_task

        return self.model.vocab_size or build_task(self.task).vocab_size


def _pydantic_error(path: str, err: ValidationError) -> RecipeError:
    key, msg = first_error(err)
    if msg.startswith("unknown key"):
        msg = "unknown key; check its spelling against the recipe schema (seqzoo/recipes.py)"
    return RecipeError(path, key, msg)


def recipe_from_dict(data: Any, *, path: str = "<dict>") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(path, "", f"expected a mapping at the top level, got {type(data).__name__}")
    try:
        recipe = Recipe.model_validate(data)
        return recipe.validate_all()
    except ValidationError as err:
        raise _pydantic_error(path, err) from None
    except ConfigError as err:
        raise RecipeError(path, err.key, err.message) from None


def resolve_recipe_path(path: str | Path) -> Path:
    """A path, or a bare recipe name looked up in ./recipes/."""
    p = Path(path)
    if p.exists():
        return p
    for candidate in (Path("recipes") / f"{path}.yaml", Path("recipes") / str(path)):
        if candidate.exists():
            return candidate
    raise RecipeError(str(path), "", "no such recipe file (give a path or a name in ./recipes/)")


def load_recipe(path: str | Path, *, overrides: Sequence[str] = ()) -> Recipe:
    """Read and validate a YAML recipe, after the command-line ``overrides`` (``KEY=VALUE``
    with dotted keys, see ``seqzoo.overrides``); every error names the file and the key."""
    from seqzoo.overrides import load_with_overrides

    p = resolve_recipe_path(path)
    data = load_yaml_file(p)  # bounded, regular files only, no duplicate keys, no alias bombs
    return load_with_overrides(data, overrides, path=str(p), validate=lambda d: recipe_from_dict(d, path=str(p)))
