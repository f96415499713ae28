"""Where training metrics go: JSONL always, TensorBoard and Weights & Biases when asked.

    train: {log: [jsonl, tensorboard]}       # or [jsonl, wandb], or all three

Every log event is one record: ``{"step": N, "split": "train" | "eval", <scalars>}``. The
training loop writes loss, lr, grad_norm, tokens_per_s and memory_mb, plus whatever the
model reports: any submodule with a ``telemetry() -> Mapping[str, float]`` method (e.g. a
Titans memory layer's per-layer statistics) contributes ``"<module name>/<key>"`` scalars.
Nested mappings in a record become ``a/b`` tags in TensorBoard and wandb; JSONL keeps the
record as it is.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

from torch import nn

from seqzoo.errors import SeqzooError
from seqzoo.train.metrics_log import MetricsLog

KINDS = ("jsonl", "tensorboard", "wandb")
TENSORBOARD_DIR = "tensorboard"
WANDB_FILE = "wandb.json"  # the run id, so a resumed run continues the same wandb run


class Logger(Protocol):
    def log(self, record: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric entries of a record (nested mappings flattened to ``a/b``), without
    ``step`` and ``split``; NaN is kept (a disabled gradient norm is NaN, not absent)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if not prefix and key in ("step", "split"):
            continue
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(scalars(value, prefix=f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def module_telemetry(model: nn.Module) -> dict[str, float]:
    """``"<module name>/<key>": value`` from every submodule that defines ``telemetry()``."""
    out: dict[str, float] = {}
    for name, module in model.named_modules():
        report = getattr(module, "telemetry", None)
        if callable(report):
            for key, value in report().items():
                out[f"{name or 'model'}/{key}"] = float(value)
    return out


class JSONLLogger:
    def __init__(self, log: MetricsLog) -> None:
        self.jsonl = log

    def log(self, record: Mapping[str, Any]) -> None:
        self.jsonl.append(dict(record))

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """Event files in ``OUT/tensorboard``; tags ``train/loss``, ``eval/bpb``, ... ."""

    def __init__(self, out_dir: Path, *, start_step: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise SeqzooError("train.log: 'tensorboard' needs the tensorboard package; "
                              "pip install 'seqzoo[tensorboard]'") from None
        log_dir = Path(out_dir) / TENSORBOARD_DIR
        if start_step == 0:  # a fresh run: no curves of an earlier run under the same tags
            shutil.rmtree(log_dir, ignore_errors=True)
        # purge_step: TensorBoard drops events at or after it from earlier files, i.e. the
        # steps a killed run logged after its last checkpoint (JSONL keeps those up to it too).
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=start_step + 1 if start_step else None)

    def log(self, record: Mapping[str, Any]) -> None:
        split = record.get("split", "train")
        for key, value in scalars(record).items():
            self.writer.add_scalar(f"{split}/{key}", value, global_step=record["step"])
        self.writer.flush()  # a crash loses nothing already logged

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """Weights & Biases (``pip install wandb``); project from $WANDB_PROJECT (default
    "seqzoo"), offline with WANDB_MODE=offline. Resuming continues the same wandb run."""

    def __init__(self, out_dir: Path, *, start_step: int, name: str, config: Mapping[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            raise SeqzooError("train.log: 'wandb' needs the wandb package; pip install wandb") from None
        id_file = Path(out_dir) / WANDB_FILE
        run_id = json.loads(id_file.read_text())["id"] if start_step and id_file.exists() else wandb.util.generate_id()
        id_file.write_text(json.dumps({"id": run_id}))
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "seqzoo"), name=name, id=run_id,
                              resume="allow", dir=str(out_dir), config=dict(config))

    def log(self, record: Mapping[str, Any]) -> None:
        split = record.get("split", "train")
        values = {f"{split}/{k}": v for k, v in scalars(record).items() if math.isfinite(v)}
        self.run.log(values, step=record["step"])

    def close(self) -> None:
        self.run.finish()


class Loggers:
    """Every configured logger behind one ``log`` / ``close``."""

    def __init__(self, loggers: Sequence[Logger]) -> None:
        self.loggers = list(loggers)

    def log(self, record: Mapping[str, Any]) -> None:
        for logger in self.loggers:
            logger.log(record)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def build_loggers(kinds: Sequence[str], *, jsonl: MetricsLog, out_dir: Path, start_step: int, name: str,
                  config: Mapping[str, Any]) -> Loggers:
    """JSONL always (``jsonl``), then TensorBoard / wandb if ``kinds`` names them."""
    loggers: list[Logger] = [JSONLLogger(jsonl)]
    if "tensorboard" in kinds:
        loggers.append(TensorBoardLogger(out_dir, start_step=start_step))
    if "wandb" in kinds:
        loggers.append(WandbLogger(out_dir, start_step=start_step, name=name, config=config))
    return Loggers(loggers)
