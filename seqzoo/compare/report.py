"""``report.md`` (one row per model: parameters, chosen learning rate, final metrics,
tokens/s, peak memory, wall time; the headline metric against test length) and two PNGs:
loss curves, and the headline metric against sequence length."""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from seqzoo.compare.runner import CompareResult


def _fmt(value: float, digits: int = 3) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def summary_table(c: CompareResult) -> str:
    metrics = list(c.metrics)
    head = ["model", "params", "lr", *[f"final {m}" for m in metrics], "tokens/s", "peak mem (MB)", "wall (s)"]
    rows = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for m in c.models:
        run = m.best_run
        if run is None:  # every run failed: see the Failures section
            rows.append(f"| {m.label} | {m.params:,} | — | failed | " + " | ".join(["—"] * (len(metrics) + 2)) + " |")
            continue
        vals = [_fmt(run.final_eval.get(k, math.nan), 4) for k in metrics]
        rows.append(f"| {m.label} | {m.params:,} | {run.lr:g} | " + " | ".join(vals)
                    + f" | {run.tokens_per_s:,.0f} | {_fmt(run.peak_memory_mb, 1)} | {_fmt(run.wall_time_s, 1)} |")
    return "\n".join(rows)


def length_table(c: CompareResult) -> str:
    marks = [f"{n}{'*' if n == c.train_seq_len else ''}" for n in c.seq_lens]
    rows = ["| model | " + " | ".join(f"T={m}" for m in marks) + " |",
            "|---|" + "|".join(["---:"] * len(marks)) + "|"]
    for m in c.models:
        rows.append(f"| {m.label} | " + " | ".join(_fmt(m.by_seq_len.get(n, {}).get(c.headline, math.nan), 4)
                                                  for n in c.seq_lens) + " |")
    return "\n".join(rows)


def lr_table(c: CompareResult, lrs: list[float]) -> str:
    rows = ["| model | " + " | ".join(f"lr={lr:g}" for lr in lrs) + " |", "|---|" + "|".join(["---:"] * len(lrs)) + "|"]
    for m in c.models:
        by_lr = {}
        for r in m.runs:
            if r.error:
                by_lr[r.lr] = "diverged" if r.error.startswith("diverged") else "failed"
            else:
                by_lr[r.lr] = _fmt(r.final_eval.get(c.headline, math.nan), 4)
        rows.append(f"| {m.label} | " + " | ".join(by_lr.get(lr, "—") for lr in lrs) + " |")
    return "\n".join(rows)


def _curves(c: CompareResult) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for m in c.models:
        if m.best_run is None:
            continue
        log = Path(m.best_run.out_dir) / "metrics.jsonl"
        if log.exists():
            out[m.label] = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return out


def _styles(n: int) -> list[dict[str, Any]]:
    """Distinct colour + marker per model (matplotlib's default cycle repeats after 10)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    markers = "osD^vP*Xh<>p"
    return [{"color": cmap(i % 20), "marker": markers[i % len(markers)]} for i in range(n)]


def plot_loss_curves(c: CompareResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(13, 4))
    curves = _curves(c)
    for (label, records), style in zip(curves.items(), _styles(len(curves))):
        train = [r for r in records if r.get("split") == "train"]
        evals = [r for r in records if r.get("split") == "eval" and c.headline in r]
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, color=style["color"], label=label)
        ax_eval.plot([r["step"] for r in evals], [r[c.headline] for r in evals], ms=3, label=label, **style)
    ax_loss.set(xlabel="step", ylabel="train loss (nats/token)", title=f"{c.sweep.name}: training loss")
    ax_eval.set(xlabel="step", ylabel=f"eval {c.headline}", title=f"held-out {c.headline}")
    ax_eval.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_metric_vs_length(c: CompareResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    shown = [m for m in c.models if m.by_seq_len]  # a model whose runs all failed has no points
    for m, style in zip(shown, _styles(len(shown))):
        xs = [n for n in c.seq_lens if n in m.by_seq_len]
        ax.plot(xs, [m.by_seq_len[n][c.headline] for n in xs], label=m.label, **style)
    ax.axvline(c.train_seq_len, color="grey", ls="--", lw=1, label="train length")
    if len(c.seq_lens) > 1 and max(c.seq_lens) / max(1, min(c.seq_lens)) >= 4:
        ax.set_xscale("log", base=2)
    ax.set(xlabel="test sequence length", ylabel=c.headline, title=f"{c.sweep.name}: {c.headline} vs length")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(c: CompareResult, *, task_spec: dict[str, Any], train_spec: dict[str, Any], lrs: list[float]) -> Path:
    out = c.out_dir
    plots = [plot_loss_curves(c, out / "loss_curves.png"), plot_metric_vs_length(c, out / "metric_vs_seq_len.png")]
    c.table = summary_table(c)
    from seqzoo.compare.runner import higher_is_better

    direction = "higher" if higher_is_better(c.headline) else "lower"
    shared = {k: train_spec[k] for k in ("steps", "batch_size", "grad_accum", "warmup_steps", "min_lr_ratio",
                                          "weight_decay", "betas", "grad_clip", "seed", "precision")}
    lines = [
        f"# Comparison: {c.sweep.name}{' (smoke run)' if c.smoke else ''}",
        "",
        c.sweep.description.strip() or "",
        "",
        f"* sweep: `{c.sweep_path}` · device: {c.device} · {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
        f" · total wall time {c.wall_time_s:.0f} s" + (f" ({c.jobs} models trained at a time)" if c.jobs > 1 else ""),
        f"* task: `{json.dumps(task_spec)}`; headline metric **{c.headline}** ({direction} is better)",
        f"* identical for every model: data order (fingerprint `{c.data_fingerprint}`), seed, steps and "
        f"schedule (AdamW, warmup + cosine): `{json.dumps(shared)}`",
        f"* learning rates tried: {', '.join(f'{lr:g}' for lr in lrs)}"
        + (" (each model keeps the one with the best final held-out metric)" if len(lrs) > 1 else ""),
        "",
        "## Results",
        "",
        c.table,
        "",
        "Final metrics on the held-out split at the training length. tokens/s: training throughput; "
        "peak mem: the peak memory the run added (CUDA: peak allocated; CPU: peak growth of the "
        "process's resident set, sampled); wall: training time.",
        "",
        f"## {c.headline} vs test sequence length (* = training length)",
        "",
        length_table(c),
        "",
    ]
    if len(lrs) > 1:
        lines += ["## Learning-rate sweep (final held-out " + c.headline + ")", "", lr_table(c, lrs), ""]
    failures = [f"* {m.label}, lr={r.lr:g}: {r.error}" for m in c.models for r in m.runs if r.error]
    if failures:
        lines += ["## Failures", "", *failures, ""]
    lines += ["## Plots", "", *[f"![{p.stem}]({p.name})" for p in plots], ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    c.report, c.plots = report, plots
    return report
