"""Run a sweep: every model trained by the one harness on identical data, then evaluated at
each test length; the report and plots are written by ``seqzoo.compare.report``."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import platform
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from seqzoo.compare.schema import ModelEntry, Sweep, load_sweep
from seqzoo.errors import RecipeError, SeqzooError
from seqzoo.models.lm import LanguageModel
from seqzoo.recipes import Recipe, recipe_from_dict, resolve_recipe_path
from seqzoo.safe_yaml import load_yaml_file
from seqzoo.tasks import Task, build_task
from seqzoo.train.evaluate import evaluate
from seqzoo.train.loop import TrainingDiverged, _autocast, resolve_device, train

LOWER_IS_BETTER = {"loss", "bpb", "ppl", "perplexity"}


def higher_is_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER


@dataclasses.dataclass
class RunResult:
    """One (model, learning rate) training run."""

    lr: float
    out_dir: str
    final_eval: dict[str, float] = dataclasses.field(default_factory=dict)
    wall_time_s: float = float("nan")
    tokens_per_s: float = float("nan")
    peak_memory_mb: float = float("nan")
    error: str | None = None  # divergence or failure, in one line


@dataclasses.dataclass
class ModelResult:
    label: str
    recipe_path: str
    params: int
    runs: list[RunResult]
    best: int | None  # index into runs; None when every run failed
    by_seq_len: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)

    @property
    def best_run(self) -> RunResult | None:
        return None if self.best is None else self.runs[self.best]


@dataclasses.dataclass
class CompareResult:
    sweep: Sweep
    sweep_path: str
    out_dir: Path
    headline: str
    metrics: tuple[str, ...]
    seq_lens: list[int]
    train_seq_len: int
    models: list[ModelResult]
    smoke: bool
    device: str
    data_fingerprint: str
    wall_time_s: float
    jobs: int = 1
    report: Path | None = None
    plots: list[Path] = dataclasses.field(default_factory=list)
    table: str = ""

    @property
    def failed(self) -> list[str]:
        """Labels of the models none of whose runs finished."""
        return [m.label for m in self.models if m.best is None]


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _find_recipe(entry: ModelEntry, sweep_path: Path) -> Path:
    p = Path(entry.recipe)
    if p.exists():
        return p
    beside = sweep_path.parent / entry.recipe
    if beside.exists():
        return beside
    return resolve_recipe_path(entry.recipe)


def effective_settings(sweep: Sweep, *, smoke: bool) -> tuple[dict[str, Any], dict[str, Any], list[float], list[int]]:
    """(task spec, train spec, learning rates, eval lengths) after ``--smoke`` is applied."""
    task = dict(sweep.task)
    train = sweep.train.model_dump(mode="json")
    lrs = list(sweep.lrs or [sweep.train.lr])
    seq_lens = list(sweep.eval_seq_lens)
    if smoke:
        s = sweep.smoke
        task = _merge(task, s.task)
        train.update(steps=s.steps, batch_size=min(train["batch_size"], s.batch_size), grad_accum=1,
                     eval_batches=s.eval_batches, eval_batch_size=s.eval_batch_size, eval_every=s.steps,
                     ckpt_every=s.steps, log_every=1, warmup_steps=min(train["warmup_steps"], 1), sample_tokens=0)
        lrs = lrs[:s.lrs]
        seq_lens = s.eval_seq_lens if s.eval_seq_lens is not None else seq_lens[:2]
    return task, train, lrs, seq_lens


def build_recipes(sweep: Sweep, sweep_path: str | Path, *, smoke: bool = False,
                  device: str | None = None) -> list[tuple[str, str, Recipe]]:
    """(label, recipe path, validated recipe) per model: the recipe's model section, the
    sweep's task and train spec. Every error names the sweep file and the model entry."""
    sweep_path = Path(sweep_path)
    task, train, _, _ = effective_settings(sweep, smoke=smoke)
    if device is not None:
        train["device"] = device
    out = []
    for i, entry in enumerate(sweep.models):
        where = f"{sweep_path}: models[{i}]"
        try:
            path = _find_recipe(entry, sweep_path)
        except RecipeError:
            raise RecipeError(str(sweep_path), f"models[{i}].recipe", f"no such recipe file {entry.recipe!r}") from None
        data = load_yaml_file(path)
        if not isinstance(data, dict):
            raise RecipeError(str(path), "", "expected a mapping at the top level")
        if not isinstance(data.get("model", {}), dict):
            raise RecipeError(str(path), "model", f"expected a mapping, got {type(data['model']).__name__}")
        model = _merge(_merge(data.get("model", {}), sweep.model), entry.model)
        if "vocab_size" not in {**sweep.model, **entry.model}:
            model["vocab_size"] = None  # the task's vocabulary, whatever the recipe was written for
        label = entry.name or data.get("name") or path.stem
        merged = {"name": label, "description": data.get("description", ""), "model": model,
                  "task": task, "train": train}
        try:
            recipe = recipe_from_dict(merged, path=f"{where} ({path})")
        except RecipeError as err:
            raise RecipeError(err.path, err.key, err.message) from None
        out.append((label, str(path), recipe))
    labels = [label for label, _, _ in out]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise RecipeError(str(sweep_path), "models", f"two models are labelled {dupes[0]!r}; give one a `name:`")
    return out


def data_fingerprint(task: Task, batch_size: int, steps: int) -> str:
    """A hash of the first and last training batches: the same for every model of a sweep."""
    h = hashlib.sha1()
    for step in sorted({0, steps - 1}):
        for t in task.train_batch(step, batch_size):
            h.update(t.numpy().tobytes())
    return h.hexdigest()[:12]


def _pick_best(runs: list[RunResult], headline: str) -> int | None:
    ok = [i for i, r in enumerate(runs) if r.error is None and math.isfinite(r.final_eval.get(headline, math.nan))]
    if not ok:
        return None
    sign = 1 if higher_is_better(headline) else -1
    # Ties go to the smaller learning rate (listed first after sorting).
    return max(ok, key=lambda i: (sign * runs[i].final_eval[headline], -runs[i].lr))


RUN_RECORD = "compare_run.json"  # written beside each finished run's checkpoints


@dataclasses.dataclass(frozen=True)
class _Job:
    """Everything one model's runs need; picklable, so a worker process can take it."""

    label: str
    recipe_path: str
    recipe: Recipe
    lrs: tuple[float, ...]
    out: Path
    headline: str
    seq_lens: tuple[int, ...]
    eval_batches: int
    device: str
    progress: bool
    reuse: bool
    threads: int | None = None


def _reuse(run_dir: Path, recipe: Recipe) -> tuple[RunResult, Any] | None:
    """A finished run of exactly this recipe (same model, task, training and lr), if any:
    its recorded measurements and its final weights."""
    from seqzoo.train import checkpoint as ckpt

    latest = ckpt.latest_checkpoint(run_dir)
    if latest is None:
        return None
    state = ckpt.read_state(latest)
    if state.get("step") != recipe.train.steps or state.get("recipe") != recipe.model_dump(mode="json"):
        return None
    model = LanguageModel(recipe)
    ckpt.load_model_weights(latest, model)
    record = run_dir / RUN_RECORD
    if record.exists():
        return RunResult(**json.loads(record.read_text())), model
    # A run finished without its record (e.g. by `seqzoo train`): the final eval from the
    # checkpoint, throughput from the log; its peak memory is unknown.
    log = run_dir / "metrics.jsonl"
    train_records = [r for r in map(json.loads, log.read_text().splitlines()) if r.get("split") == "train"] if log.exists() else []
    tps = train_records[-1]["tokens_per_s"] if train_records else math.nan
    tokens = recipe.train.steps * recipe.train.batch_size * task_seq_len(recipe)
    return RunResult(lr=recipe.train.lr, out_dir=str(run_dir), final_eval=state.get("extra", {}).get("eval", {}),
                     wall_time_s=tokens / tps if tps else math.nan, tokens_per_s=tps), model


def task_seq_len(recipe: Recipe) -> int:
    return build_task(recipe.task).config.seq_len


def _run_model(job: _Job, echo: Callable[[str], None] = print) -> ModelResult:
    """Train one model at each learning rate, keep the best, evaluate it at each length."""
    if job.threads is not None:
        torch.set_num_threads(job.threads)
    dev = torch.device(job.device)
    task = build_task(job.recipe.task)
    spec = job.recipe.train
    runs: list[RunResult] = []
    trained: dict[int, Any] = {}
    for lr in job.lrs:
        # The device as train() records it in the checkpoint, so that reuse compares like with like.
        run_recipe = job.recipe.model_copy(update={"train": spec.model_copy(update={"lr": lr, "device": job.device})})
        run_dir = job.out / job.label / f"lr-{lr:g}"
        reused = _reuse(run_dir, run_recipe) if job.reuse else None
        if reused is not None:
            echo(f"[{job.label}] lr={lr:g} reused from {run_dir}")
            trained[len(runs)] = reused[1]
            runs.append(reused[0])
            continue
        echo(f"[{job.label}] lr={lr:g} -> {run_dir}")
        try:
            res = train(run_recipe, out_dir=run_dir, overwrite=True, progress=job.progress, device=job.device,
                        plot=False)
        except TrainingDiverged as err:
            runs.append(RunResult(lr=lr, out_dir=str(run_dir), error=f"diverged: {err}"))
            echo(f"[{job.label}] lr={lr:g} diverged")
            continue
        except (NotImplementedError, SeqzooError, RuntimeError) as err:
            runs.append(RunResult(lr=lr, out_dir=str(run_dir), error=f"{type(err).__name__}: {err}".splitlines()[0]))
            echo(f"[{job.label}] lr={lr:g} failed: {runs[-1].error}")
            continue
        run = RunResult(lr=lr, out_dir=str(run_dir), final_eval=res.final_eval, wall_time_s=res.wall_time_s,
                        tokens_per_s=res.tokens_per_s, peak_memory_mb=res.peak_memory_growth_mb)
        (run_dir / RUN_RECORD).write_text(json.dumps(dataclasses.asdict(run), indent=1))
        trained[len(runs)] = res.model
        runs.append(run)
    best = _pick_best(runs, job.headline)
    result = ModelResult(label=job.label, recipe_path=job.recipe_path, params=LanguageModel(job.recipe).num_params(),
                         runs=runs, best=best)
    if best is not None:
        model = trained[best].to(dev)
        for length in job.seq_lens:
            result.by_seq_len[length] = evaluate(model, task, n_batches=job.eval_batches,
                                                 batch_size=spec.eval_batch_size or spec.batch_size, device=dev,
                                                 seq_len=length, autocast=_autocast(spec.precision, dev))
    return result


def run_sweep(path: str | Path, *, out_dir: str | Path | None = None, smoke: bool = False,
              device: str | None = None, progress: bool = True, jobs: int = 1, reuse: bool = False,
              echo: Callable[[str], None] = print, overrides: Sequence[str] = ()) -> CompareResult:
    """Train and evaluate every model of the sweep at ``path``; write report.md, results.json
    and the plots into ``out_dir``. ``jobs`` > 1 trains that many models at once in worker
    processes (the numbers are the same; throughput then reflects a shared machine).
    ``reuse`` keeps finished runs of identical recipes, so an interrupted sweep continues;
    ``overrides`` (``KEY=VALUE``) change the sweep file's settings (e.g. ``train.steps=50``)."""
    from seqzoo.compare.report import write_report

    if jobs < 1:
        raise SeqzooError(f"--jobs: expected at least 1, got {jobs}")
    path = Path(path)
    sweep = load_sweep(path, overrides=overrides)
    recipes = build_recipes(sweep, path, smoke=smoke, device=device)  # all validated before training
    task_spec, train_spec, lrs, seq_lens = effective_settings(sweep, smoke=smoke)
    task = build_task(task_spec)
    train_seq_len = task.config.seq_len
    seq_lens = seq_lens or [train_seq_len]
    out = Path(out_dir or Path("runs") / "compare" / (sweep.name + ("-smoke" if smoke else "")))
    if out.exists() and not out.is_dir():
        raise SeqzooError(f"--out: {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device or train_spec["device"])
    headline = task.metrics[0]
    fingerprint = data_fingerprint(task, train_spec["batch_size"], train_spec["steps"])
    # Import what the first run would otherwise import inside its memory measurement
    # (the optimiser pulls in torch._dynamo), so every model is measured alike.
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
    threads = max(1, torch.get_num_threads() // jobs) if jobs > 1 else None
    todo = [_Job(label=label, recipe_path=recipe_path, recipe=recipe, lrs=tuple(sorted(lrs)), out=out,
                 headline=headline, seq_lens=tuple(seq_lens),
                 eval_batches=train_spec["eval_batches"] if smoke else sweep.eval_batches, device=str(dev),
                 progress=progress and jobs == 1, reuse=reuse, threads=threads)
            for label, recipe_path, recipe in recipes]
    t0 = time.perf_counter()
    if jobs == 1:
        models = [_run_model(job, echo) for job in todo]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            models = list(pool.map(_run_model, todo))
    compare = CompareResult(sweep=sweep, sweep_path=str(path), out_dir=out, headline=headline,
                            metrics=task.metrics, seq_lens=seq_lens, train_seq_len=train_seq_len, models=models,
                            smoke=smoke, device=str(dev), data_fingerprint=fingerprint,
                            wall_time_s=time.perf_counter() - t0, jobs=jobs)
    write_report(compare, task_spec=task_spec, train_spec=train_spec, lrs=sorted(lrs))
    (out / "results.json").write_text(json.dumps(results_json(compare), indent=1))
    return compare


def results_json(c: CompareResult) -> dict[str, Any]:
    return {"sweep": c.sweep_path, "smoke": c.smoke, "device": c.device, "headline": c.headline,
            "train_seq_len": c.train_seq_len, "data_fingerprint": c.data_fingerprint,
            "torch": torch.__version__, "python": platform.python_version(), "wall_time_s": c.wall_time_s,
            "jobs": c.jobs,
            "models": [dataclasses.asdict(m) for m in c.models]}
