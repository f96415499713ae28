"""What a run directory holds, for tests that compare runs: train losses and file digests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def train_losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "train"]


def file_digests(out: Path) -> dict[str, str]:
    """sha256 of every regular file below ``out`` (the lock file aside: taking it is not a change)."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(out).rglob("*")) if p.is_file() and not p.is_symlink() and p.name != "train.lock"}
