"""What runs, made explicit before training starts: ``train.compile`` compiles the model
with torch.compile (inductor), and a "setup" record in metrics.jsonl names the backend
every layer uses (the same column as ``seqzoo describe``), so a log shows whether a GPU run
took its kernels or the reference path.

The model is compiled in place (``nn.Module.compile``): parameter names, and so
checkpoints, are unchanged. Kernel calls are torch.library custom ops
(``seqzoo.kernels.library``), opaque to the compiler.
"""

from __future__ import annotations

from torch import nn

from seqzoo.recipes import TrainSpec
from seqzoo.train.metrics_log import MetricsLog


def layer_backends(model: nn.Module) -> list[str]:
    """"<layer>:<mixer>:<backend>" for every block of a LanguageModel."""
    return [f"{i}:{block.mixer.name}:{block.mixer.backend}" for i, block in enumerate(model.blocks)]


def prepare_model(model: nn.Module, spec: TrainSpec, *, log: MetricsLog | None, step: int) -> None:
    if spec.compile:
        model.compile()
    if log is not None:
        log.append({"step": step, "split": "setup", "compile": spec.compile, "backends": layer_backends(model)})
