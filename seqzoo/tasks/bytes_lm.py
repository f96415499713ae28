"""Byte-level language modelling on local text files.

Default corpus: the Python standard library's own source files, found through
``sysconfig`` — present on every machine, no network. Any file or directory of .py / .txt /
.md files can be named instead. The held-out split is by file (a stable hash of the
relative path), so evaluation never sees a file that training saw. Reported in
bits-per-byte (loss in nats / ln 2).
"""

from __future__ import annotations

import math
import random
import sysconfig
import zlib
from functools import cached_property
from pathlib import Path

import torch
from pydantic import Field
from torch import Tensor

from seqzoo.errors import SeqzooError
from seqzoo.limits import MAX_CORPUS_BYTES
from seqzoo.tasks.base import Task, TaskConfig, register_task

SUFFIXES = (".py", ".txt", ".md", ".rst")


class ByteLMConfig(TaskConfig):
    path: str | None = Field(None, description="file or directory; default: the Python stdlib source")
    eval_percent: float = Field(5.0, gt=0, lt=100, description="share of files held out")
    max_bytes: int = Field(16_000_000, ge=1024, le=MAX_CORPUS_BYTES, description="cap on the corpus read into memory")


def default_corpus() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@register_task
class ByteLM(Task):
    name = "bytes"
    Config = ByteLMConfig
    metrics = ("bpb", "loss", "accuracy")

    @property
    def vocab_size(self) -> int:
        return 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", "surrogateescape"))  # argv bytes that are not UTF-8 stay bytes

    def decode(self, ids: list[int]) -> str:
        from seqzoo.models.generation import bytes_text

        return bytes_text(ids)  # ids past 255 (a model with a larger vocabulary) read as U+FFFD

    @cached_property
    def splits(self) -> dict[str, Tensor]:
        root, files = corpus_files(self.config.path, seed=self.config.seed)
        held_out, train = [], []
        budget = {"train": self.config.max_bytes, "eval": max(1024, self.config.max_bytes // 10)}
        for f in files:
            is_eval = held_out_file(root, f, self.config.eval_percent)
            if len(files) == 1:  # a single file: hold out its tail instead
                data = _read_prefix(f, self.config.max_bytes)
                cut = int(len(data) * (1 - self.config.eval_percent / 100))
                return {"train": _as_tensor(data[:cut]), "eval": _as_tensor(data[cut:])}
            split, bucket = ("eval", held_out) if is_eval else ("train", train)
            if budget[split] <= 0:
                continue
            try:
                data = _read_prefix(f, budget[split])
            except OSError:
                continue
            budget[split] -= len(data) + 1
            bucket.append(data)
        out = {"train": _as_tensor(b"\n".join(train)), "eval": _as_tensor(b"\n".join(held_out))}
        for split, data in out.items():
            if data.numel() < self.config.seq_len + 2:
                raise SeqzooError(f"task.path: the {split} split holds {data.numel()} bytes, fewer than seq_len+2")
        return out

    def make_batch(self, generator: torch.Generator, batch_size: int, *, split: str,
                   seq_len: int | None = None) -> tuple[Tensor, Tensor]:
        t = seq_len or self.config.seq_len
        data = self.splits[split]
        if data.numel() < t + 2:
            raise SeqzooError(f"seq_len={t}: the {split} split of the corpus holds {data.numel():,} bytes; "
                              f"expected a sequence length of at most {data.numel() - 2:,}")
        starts = torch.randint(0, data.numel() - t - 1, (batch_size,), generator=generator)
        idx = starts[:, None] + torch.arange(t + 1)  # (B, T+1)
        window = data[idx].long()
        return window[:, :-1], window[:, 1:]

    def report(self, loss: float, accuracy: float) -> dict[str, float]:
        return {"bpb": loss / math.log(2), "loss": loss, "accuracy": accuracy}


def corpus_files(path: str | None, *, seed: int) -> tuple[Path, list[Path]]:
    """(root, its text files in a seeded random order, so a byte cap samples every directory)."""
    root = Path(path).expanduser() if path else default_corpus()
    if not root.exists():
        raise SeqzooError(f"task.path: {root} does not exist; expected a file or directory of text files")
    if root.is_file():
        return root, [root]
    files = sorted(p for p in root.rglob("*") if p.suffix in SUFFIXES and p.is_file())
    if not files:
        raise SeqzooError(f"task.path: no {'/'.join(SUFFIXES)} files under {root}")
    random.Random(seed).shuffle(files)
    return root, files


def held_out(name: str, eval_percent: float) -> bool:
    """The split of a document by a stable hash of its name: held out iff True."""
    return zlib.crc32(name.encode()) % 10_000 < eval_percent * 100


def held_out_file(root: Path, file: Path, eval_percent: float) -> bool:
    return held_out(str(file.relative_to(root)) if file != root else file.name, eval_percent)
def _read_prefix(path: Path, limit: int) -> bytes:
    """At most ``limit`` bytes: a huge file costs no more memory than the cap."""
    with open(path, "rb") as f:
        return f.read(limit)


def _as_tensor(data: bytes) -> Tensor:
    if not data:  # frombuffer refuses an empty buffer; the split-size check reports it
        return torch.zeros(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)
