"""Metrics as JSON lines (one record per log event) and PNG plots of the curves."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
        return out

    def truncate_after(self, step: int) -> None:
        """On resume: drop records logged after the checkpoint, so none appear twice."""
        kept = [r for r in self.records() if r.get("step", -1) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)


def plot_curves(records: list[dict[str, Any]], path: Path, *, title: str = "") -> Path | None:
    """Training loss, every eval metric and the model's telemetry (``<module>/<stat>``
    records, e.g. ``blocks.0.mixer/write`` of a Titans memory: one panel per statistic, a
    line per module) against the step; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("split") == "train"]
    evals = [r for r in records if r.get("split") == "eval"]
    if not train:
        return None
    eval_keys = [k for k in (evals[0] if evals else {}) if k not in ("step", "split", "seq_len")]
    stats = sorted({k.rsplit("/", 1)[1] for k in train[-1] if "/" in k})
    cols = max(1 + len(eval_keys), len(stats))
    fig, grid = plt.subplots(2 if stats else 1, cols, figsize=(4.5 * cols, 3.5 * (2 if stats else 1)), squeeze=False)
    axes = list(grid[0])
    for ax in axes[1 + len(eval_keys):]:
        ax.axis("off")
    for i, ax in enumerate(grid[1] if stats else []):
        if i >= len(stats):
            ax.axis("off")
            continue
        stat, values = stats[i], []
        for key in sorted(k for k in train[-1] if "/" in k and k.rsplit("/", 1)[1] == stat):
            pts = [(r["step"], r[key]) for r in train if key in r]
            values += [v for _, v in pts]
            ax.plot(*zip(*pts), lw=1, label=key.rsplit("/", 1)[0])
        ax.set(xlabel="step", ylabel=stat, title=stat)
        if values and min(values) > 0 and max(values) / min(values) > 20:
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], lw=1)
    axes[0].set(xlabel="step", ylabel="train loss (nats/token)", title=title or "training loss")
    for ax, key in zip(axes[1:], eval_keys):
        ax.plot([r["step"] for r in evals], [r[key] for r in evals], marker="o")
        ax.set(xlabel="step", ylabel=f"eval {key}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
