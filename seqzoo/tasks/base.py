"""The task contract: seeded, deterministic batches so every model in a comparison sees
the same data in the same order, and resumed training continues on exactly the batches
it would have seen.

A batch is ``(inputs, targets)``, both (B, T) long; targets are -100 where no loss is taken.
"""

from __future__ import annotations

from typing import Any, ClassVar, Iterator

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor

from seqzoo.limits import MAX_SEED, MAX_SEQ_LEN
from seqzoo.mixers.base import ConfigError
from seqzoo.strict_schema import STRICT, first_error, short_repr

IGNORE = -100


class TaskConfig(BaseModel):
    """Strict types (``seqzoo.strict_schema``); subclasses that redefine ``seq_len`` keep
    its bounds (``ge=1, le=MAX_SEQ_LEN``)."""

    model_config = ConfigDict(**STRICT, frozen=True)

    seq_len: int = Field(256, ge=1, le=MAX_SEQ_LEN)
    seed: int = Field(0, ge=0, le=MAX_SEED)


class Task:
    """Subclasses set ``name`` and ``Config`` and implement ``make_batch``."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[TaskConfig]] = TaskConfig
    # Which of the harness's aggregates the task reports (and the headline metric first).
    metrics: ClassVar[tuple[str, ...]] = ("loss",)

    def __init__(self, config: TaskConfig) -> None:
        self.config = config

    @property
    def vocab_size(self) -> int:
        """Smallest vocabulary a model needs for this task."""
        raise NotImplementedError

    def make_batch(self, generator: torch.Generator, batch_size: int, *, split: str,
                   seq_len: int | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    # -- deterministic streams ---------------------------------------------------------
    def _generator(self, stream: int, index: int) -> torch.Generator:
        # Distinct, reproducible streams: (task seed, train/eval, step) -> one generator.
        return torch.Generator().manual_seed(hash((self.config.seed, stream, index)) & 0x7FFF_FFFF_FFFF)

    def train_batch(self, step: int, batch_size: int, *, rank: int = 0, world_size: int = 1) -> tuple[Tensor, Tensor]:
        """The global batch of ``step`` (identical for every run of this task), or this
        rank's contiguous shard of it under data parallelism."""
        inputs, targets = self.make_batch(self._generator(0, step), batch_size, split="train")
        if world_size > 1:
            if batch_size % world_size:
                raise ConfigError("train.batch_size", f"must be divisible by the world size {world_size}, got {batch_size}")
            per = batch_size // world_size
            inputs, targets = inputs[rank * per:(rank + 1) * per], targets[rank * per:(rank + 1) * per]
        return inputs, targets

    def eval_batches(self, n_batches: int, batch_size: int, *, seq_len: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """A fixed held-out set: the same batches at every evaluation."""
        for i in range(n_batches):
            yield self.make_batch(self._generator(1, i * 1_000_003 + (seq_len or 0)), batch_size,
                                  split="eval", seq_len=seq_len)

    def report(self, loss: float, accuracy: float) -> dict[str, float]:
        """Map the harness's mean loss (nats/token) and accuracy to this task's metrics."""
        return {"loss": loss, "accuracy": accuracy}


_TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    _TASKS[cls.name] = cls
    return cls


def available_tasks() -> list[str]:
    import seqzoo.tasks  # noqa: F401

    return sorted(_TASKS)


def build_task(spec: dict[str, Any]) -> Task:
    """``spec`` is the recipe's ``task`` mapping: ``type`` plus the task's own settings."""
    import seqzoo.tasks  # noqa: F401

    if not isinstance(spec, dict):
        raise ConfigError("", f"expected a mapping with a `type` (a task name), got {short_repr(spec)}")
    spec = dict(spec)
    name = spec.pop("type", None)
    if not isinstance(name, str) or name not in _TASKS:
        raise ConfigError("type", f"unknown task {short_repr(name)}; expected one of {sorted(_TASKS)}")
    cls = _TASKS[name]
    try:
        config = cls.Config.model_validate(spec)
    except ValidationError as err:
        key, msg = first_error(err, allowed_keys=sorted(cls.Config.model_fields))
        if msg.startswith("unknown key"):
            msg = msg.replace("unknown key", f"unknown key for task {name!r}", 1)
        raise ConfigError(key, msg) from None
    return cls(config)
