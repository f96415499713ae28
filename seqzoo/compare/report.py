"""``report.md`` (one row per model: parameters, chosen learning rate, final metrics as
mean ± std over seeds, tokens/s, peak memory, wall time; the headline metric against test
length; the claims, each with its verdict) and two PNGs: loss curves, and the headline metric
against sequence length, with the seeds' spread shaded. Models are told apart by colour, line
style and marker, and with more than ``SMALL_MULTIPLES`` models each plot becomes small
multiples, one panel per mixer family."""

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


def _pm(values: list[float], digits: int = 4) -> str:
    """One value, or mean ± std over seeds."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return "—"
    if len(finite) == 1:
        return _fmt(finite[0], digits)
    mean = sum(finite) / len(finite)
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1))
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def summary_table(c: CompareResult) -> str:
    metrics = list(c.metrics)
    seeds = len(c.seeds) > 1
    head = ["model", "params", "lr", *[f"final {m}" for m in metrics], *(["seeds"] if seeds else []),
            "tokens/s", "peak mem (MB)", "wall (s)"]
    rows = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for m in c.models:
        run = m.best_run
        if run is None:  # every run failed: see the Failures section
            rows.append(f"| {m.label} | {m.params:,} | — | failed | "
                        + " | ".join(["—"] * (len(metrics) + 2 + seeds)) + " |")
            continue
        chosen = m.best_runs()
        vals = [_pm([r.final_eval.get(k, math.nan) for r in chosen]) for k in metrics]
        n_at_lr = sum(r.lr == run.lr for r in m.runs)
        seed_col = [f"{len(chosen)}/{n_at_lr}"] if seeds else []
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        rows.append(f"| {m.label} | {m.params:,} | {run.lr:g} | " + " | ".join(vals + seed_col)
                    + f" | {mean([r.tokens_per_s for r in chosen]):,.0f}"
                    + f" | {_fmt(mean([r.peak_memory_mb for r in chosen]), 1)}"
                    + f" | {_fmt(mean([r.wall_time_s for r in chosen]), 1)} |")
    return "\n".join(rows)


def length_table(c: CompareResult) -> str:
    marks = [f"{n}{'*' if n == c.train_seq_len else ''}" for n in c.seq_lens]
    rows = ["| model | " + " | ".join(f"T={m}" for m in marks) + " |",
            "|---|" + "|".join(["---:"] * len(marks)) + "|"]
    for m in c.models:
        rows.append(f"| {m.label} | " + " | ".join(_pm(m.values(n, c.headline)) for n in c.seq_lens) + " |")
    return "\n".join(rows)


def claims_table(c: CompareResult) -> str:
    rows = ["| claim | source | measured | verdict |", "|---|---|---|---|"]
    for r in c.claims:
        cell = lambda text: text.replace("|", "\\|").replace("\n", " ")  # noqa: E731
        rows.append(f"| {cell(r.claim.claim)} | {cell(r.claim.source)} | {cell(r.measured)} | "
                    + ("holds" if r.holds else "**fails**") + " |")
    return "\n".join(rows)


def lr_table(c: CompareResult, lrs: list[float]) -> str:
    rows = ["| model | " + " | ".join(f"lr={lr:g}" for lr in lrs) + " |", "|---|" + "|".join(["---:"] * len(lrs)) + "|"]
    for m in c.models:
        by_lr = {}
        for lr in {r.lr for r in m.runs}:
            runs = [r for r in m.runs if r.lr == lr]
            done = [r.final_eval.get(c.headline, math.nan) for r in runs if not r.error]
            errors = [r for r in runs if r.error]
            cell = _pm(done) if done else ""
            if errors:
                what = "diverged" if all(r.error.startswith("diverged") for r in errors) else "failed"
                cell += (f" ({len(errors)}/{len(runs)} {what})" if done else what)
            by_lr[lr] = cell
        rows.append(f"| {m.label} | " + " | ".join(by_lr.get(lr, "—") for lr in lrs) + " |")
    return "\n".join(rows)


SMALL_MULTIPLES = 8  # more models than this: one panel per mixer family

_FAMILY = {"attention": "attention", "mamba": "SSM (Mamba)", "mamba2": "SSM (Mamba)", "deltanet": "delta rule",
           "gated_deltanet": "delta rule", "ttt": "TTT", "retnet": "linear attention", "gla": "linear attention"}


def family(mixer_types: list[str]) -> str:
    """The plot panel of a model, from its mixers' types (a mixed stack is a hybrid)."""
    if any(t.startswith("titans") for t in mixer_types):
        return "Titans"
    names = {_FAMILY.get(t, t) for t in mixer_types}
    return names.pop() if len(names) == 1 else "hybrid"


def _curves(c: CompareResult) -> dict[str, list[list[dict[str, Any]]]]:
    """label -> one metrics log per finished seed at the chosen learning rate."""
    out = {}
    for m in c.models:
        logs = []
        for run in m.best_runs():
            log = Path(run.out_dir) / "metrics.jsonl"
            if log.exists():
                logs.append([json.loads(line) for line in log.read_text().splitlines() if line.strip()])
        if logs:
            out[m.label] = logs
    return out


def _styles(n: int) -> list[dict[str, Any]]:
    """Distinct colour, line style and marker per model (tab10 x four line styles: 40 apart)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    lines, markers = ["-", "--", "-.", ":"], "osD^vP*Xh<>p"
    return [{"color": cmap(i % 10), "ls": lines[(i // 10) % 4], "marker": markers[i % len(markers)]}
            for i in range(n)]


def _panels(c: CompareResult, labels: list[str]) -> list[tuple[str, list[str]]]:
    """(title, labels) per panel: one panel, or one per family with many models."""
    if len(labels) <= SMALL_MULTIPLES:
        return [("", labels)]
    groups: dict[str, list[str]] = {}
    fam = {m.label: m.family for m in c.models}
    for label in labels:
        groups.setdefault(fam.get(label) or "other", []).append(label)
    return list(groups.items())


def _mean_band(series: list[tuple[list[int], list[float]]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Mean, min and max over seeds at the steps every seed logged."""
    common = sorted(set.intersection(*(set(x) for x, _ in series)))
    at = [dict(zip(x, y)) for x, y in series]
    vals = [[d[s] for d in at] for s in common]
    return common, [sum(v) / len(v) for v in vals], [min(v) for v in vals], [max(v) for v in vals]


def _grid(n: int):
    import matplotlib.pyplot as plt

    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False, sharey=True)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def plot_loss_curves(c: CompareResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = _curves(c)
    style = dict(zip(curves, _styles(len(curves))))
    panels = _panels(c, list(curves))
    fig, grid = _grid(2 * len(panels))
    for (title, labels), ax_loss, ax_eval in zip(panels, grid[0::2], grid[1::2]):
        for label in labels:
            st = style[label]
            logs = curves[label]
            train = [([r["step"] for r in log if r.get("split") == "train"],
                      [r["loss"] for r in log if r.get("split") == "train"]) for log in logs]
            evals = [([r["step"] for r in log if r.get("split") == "eval" and c.headline in r],
                      [r[c.headline] for r in log if r.get("split") == "eval" and c.headline in r]) for log in logs]
            for ax, series, marker in ((ax_loss, train, None), (ax_eval, evals, st["marker"])):
                if not all(x for x, _ in series):
                    continue
                xs, mean, lo, hi = _mean_band(series)
                ax.plot(xs, mean, lw=1.2, color=st["color"], ls=st["ls"], marker=marker, ms=3, label=label)
                if len(series) > 1:
                    ax.fill_between(xs, lo, hi, color=st["color"], alpha=0.15, lw=0)
        suffix = f" — {title}" if title else ""
        ax_loss.set(xlabel="step", ylabel="train loss (nats/token)", title=f"{c.sweep.name}: training loss{suffix}")
        ax_eval.set(xlabel="step", ylabel=f"eval {c.headline}", title=f"held-out {c.headline}{suffix}")
        ax_eval.legend(fontsize=7, loc="best")
    if len(c.seeds) > 1:
        fig.suptitle(f"mean over {len(c.seeds)} seeds; shaded: min–max", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_metric_vs_length(c: CompareResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in c.models if m.by_seq_len]  # a model whose runs all failed has no points
    style = dict(zip((m.label for m in shown), _styles(len(shown))))
    by_label = {m.label: m for m in shown}
    panels = _panels(c, list(by_label))
    fig, axes = _grid(len(panels))
    for (title, labels), ax in zip(panels, axes):
        for label in labels:
            m, st = by_label[label], style[label]
            xs = [n for n in c.seq_lens if m.values(n, c.headline)]
            per_seed = [m.values(n, c.headline) for n in xs]
            ax.plot(xs, [sum(v) / len(v) for v in per_seed], label=label, **st)
            if any(len(v) > 1 for v in per_seed):
                ax.fill_between(xs, [min(v) for v in per_seed], [max(v) for v in per_seed], color=st["color"],
                                alpha=0.15, lw=0)
        ax.axvline(c.train_seq_len, color="grey", ls="--", lw=1, label="train length")
        if len(c.seq_lens) > 1 and max(c.seq_lens) / max(1, min(c.seq_lens)) >= 4:
            ax.set_xscale("log", base=2)
        ax.set(xlabel="test sequence length", ylabel=c.headline,
               title=f"{c.sweep.name}: {c.headline} vs length" + (f" — {title}" if title else ""))
        ax.legend(fontsize=7, loc="best")
    if len(c.seeds) > 1:
        fig.suptitle(f"mean over {len(c.seeds)} seeds; shaded: min–max", fontsize=9)
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
        "Final metrics on the held-out split at the training length"
        + (f", mean ± std over seeds {c.seeds} at the learning rate with the best seed mean" if len(c.seeds) > 1 else "")
        + f" ({c.sweep.eval_batches if not c.smoke else c.sweep.smoke.eval_batches} batches: the same measurement "
        "as the training-length column below). tokens/s: training throughput; "
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
    if c.claims:
        c.claims_table = claims_table(c)
        held = sum(r.holds for r in c.claims)
        lines += ["## Claims", "", f"{held} of {len(c.claims)} published results hold here"
                  + (" (a smoke run: too short to test them)" if c.smoke else "") + ".", "", c.claims_table, ""]
    lines += ["## Plots", "", *[f"![{p.stem}]({p.name})" for p in plots], ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    c.report, c.plots = report, plots
    return report
