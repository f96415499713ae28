"""Run a sweep: every model trained by the one harness on identical data, then evaluated at
each test length; the report and plots are written by ``seqzoo.compare.report``."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from seqzoo.compare.report import family
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
    """One (model, learning rate, seed) training run."""

    lr: float
    out_dir: str
    final_eval: dict[str, float] = dataclasses.field(default_factory=dict)  # held-out, at the training length
    wall_time_s: float = float("nan")
    tokens_per_s: float = float("nan")
    peak_memory_mb: float = float("nan")
    error: str | None = None  # divergence or failure, in one line
    seed: int = 0


@dataclasses.dataclass
class ModelResult:
    label: str
    recipe_path: str
    params: int
    runs: list[RunResult]
    best: int | None  # index into runs of the best learning rate's first finished seed; None when every run failed
    by_seq_len: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)  # seed mean
    by_seq_len_std: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)  # over seeds (0 for one)
    seed_evals: dict[int, list[dict[str, float]]] = dataclasses.field(default_factory=dict)  # per finished seed
    family: str = ""  # the plots' panel (``report.family``)

    @property
    def best_run(self) -> RunResult | None:
        return None if self.best is None else self.runs[self.best]

    @property
    def best_lr(self) -> float | None:
        return None if self.best is None else self.runs[self.best].lr

    def best_runs(self) -> list[RunResult]:
        """The finished runs (one per seed) at the chosen learning rate."""
        lr = self.best_lr
        return [r for r in self.runs if r.lr == lr and r.error is None]

    def values(self, seq_len: int, metric: str) -> list[float]:
        """One value per finished seed at the chosen learning rate."""
        return [e[metric] for e in self.seed_evals.get(seq_len, []) if metric in e]


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
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])
    claims: list[Any] = dataclasses.field(default_factory=list)  # seqzoo.compare.claims.ClaimResult
    report: Path | None = None
    plots: list[Path] = dataclasses.field(default_factory=list)
    table: str = ""
    claims_table: str = ""

    @property
    def failed(self) -> list[str]:
        """Labels of the models none of whose runs finished."""
        return [m.label for m in self.models if m.best is None]

    @property
    def failed_claims(self) -> list[str]:
        return [r.claim.claim for r in self.claims if not r.holds]


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
    seq_lens = list(sweep.eval_seq_lens)  # the seeds: ``effective_seeds``
    if smoke:
        s = sweep.smoke
        task = _merge(task, s.task)
        train.update(steps=s.steps, batch_size=min(train["batch_size"], s.batch_size), grad_accum=1,
                     eval_batches=s.eval_batches, eval_batch_size=s.eval_batch_size, eval_every=s.steps,
                     ckpt_every=s.steps, log_every=1, warmup_steps=min(train["warmup_steps"], 1), sample_tokens=0)
        lrs = lrs[:s.lrs]
        seq_lens = s.eval_seq_lens if s.eval_seq_lens is not None else seq_lens[:2]
    return task, train, lrs, seq_lens


def effective_seeds(sweep: Sweep, *, smoke: bool) -> list[int]:
    seeds = list(sweep.seeds or [sweep.train.seed])
    return seeds[:sweep.smoke.seeds] if smoke else seeds


def check_claims_refer(sweep: Sweep, sweep_path: str | Path, labels: list[str]) -> None:
    """Every claim names models, a metric and lengths the full sweep measures (checked before
    any training; a ``--smoke`` run tests fewer lengths, so its claims may fail unmeasured)."""
    from seqzoo.compare.claims import claim_problems

    task_spec, _, _, seq_lens = effective_settings(sweep, smoke=False)
    task = build_task(task_spec)
    for i, claim in enumerate(sweep.claims):
        problems = claim_problems(claim, labels, task.metrics, seq_lens or [task.config.seq_len],
                                  task.config.seq_len)
        if problems:
            key, message = problems[0]
            raise RecipeError(str(sweep_path), f"claims[{i}].{key}", message)


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
    check_claims_refer(sweep, sweep_path, labels)
    return out


def data_fingerprint(task: Task, batch_size: int, steps: int) -> str:
    """A hash of the first and last training batches: the same for every model of a sweep."""
    h = hashlib.sha1()
    for step in sorted({0, steps - 1}):
        for t in task.train_batch(step, batch_size):
            h.update(t.numpy().tobytes())
    return h.hexdigest()[:12]


def _pick_best(runs: list[RunResult], headline: str) -> int | None:
    """The learning rate with the best seed mean of the headline metric (learning rates where
    every seed finished come first; ties go to the smaller one), as the index of its first
    finished run."""
    def ok(r: RunResult) -> bool:
        return r.error is None and math.isfinite(r.final_eval.get(headline, math.nan))

    by_lr: dict[float, list[int]] = {}
    for i, r in enumerate(runs):
        by_lr.setdefault(r.lr, []).append(i)
    sign = 1 if higher_is_better(headline) else -1
    scored = []
    for lr, idx in by_lr.items():
        good = [i for i in idx if ok(runs[i])]
        if good:
            mean = sum(runs[i].final_eval[headline] for i in good) / len(good)
            scored.append((len(good) == len(idx), sign * mean, -lr, good[0]))
    return max(scored)[3] if scored else None


RUN_RECORD = "compare_run.json"  # written beside each finished run's checkpoints
RESOLVED_RECORD = "resolved_model.json"  # the model it trained, after the library's defaults (see resolved_model)


@dataclasses.dataclass(frozen=True)
class _Job:
    """Everything one model's runs need; picklable, so a worker process can take it."""

    label: str
    recipe_path: str
    recipe: Recipe
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    seed_dirs: bool  # lr-X/seed-S run directories (a sweep with `seeds:`) instead of lr-X
    out: Path
    headline: str
    seq_lens: tuple[int, ...]
    eval_batches: int
    device: str
    progress: bool
    reuse: bool
    threads: int | None = None

    def run_dir(self, lr: float, seed: int) -> Path:
        d = self.out / self.label / f"lr-{lr:g}"
        return d / f"seed-{seed}" if self.seed_dirs else d


def resolved_model(recipe: Recipe) -> dict[str, Any]:
    """What a reused run must match beyond its recipe: every layer's mixer settings after the
    library's defaults, and every parameter's name and shape. A recipe that leaves a setting
    out picks up the library's default, so when a default changes the same recipe builds a
    different model, which must be trained, not reused. Built on the meta device (no memory)."""
    with torch.device("meta"):
        model = LanguageModel(recipe)
    layers = [{"type": block.mixer.name, **block.mixer.config.model_dump(mode="json")} for block in model.blocks]
    return {"layers": layers, "params": {n: list(p.shape) for n, p in model.state_dict().items()}}


def _same_model(run_dir: Path, checkpoint: Path, recipe: Recipe) -> bool:
    """The run in ``run_dir`` was trained with the model ``recipe`` builds today: its recorded
    resolved settings match or, for a run without the record (interrupted, or older than it),
    the checkpoint holds exactly the parameter names and shapes of today's model (a tied head
    is saved under its own name too)."""
    from seqzoo.train.safetensors_header import read_header

    now = resolved_model(recipe)
    record = run_dir / RESOLVED_RECORD
    if record.exists():
        return json.loads(record.read_text()) == now
    weights = checkpoint / "model.safetensors"
    if not weights.exists():
        return False
    return {k: list(e.shape) for k, e in read_header(weights).items()} == now["params"]


def _checkpoint_of(run_dir: Path, recipe: Recipe, echo: Callable[[str], None] | None = None
                   ) -> tuple[Path, int] | None:
    """The latest complete checkpoint of exactly this recipe and model in ``run_dir``, and its step."""
    from seqzoo.train import checkpoint as ckpt

    latest = ckpt.latest_checkpoint(run_dir)
    if latest is None:
        return None
    state = ckpt.read_state(latest)
    if state.get("recipe") != recipe.model_dump(mode="json"):
        return None
    if not _same_model(run_dir, latest, recipe):
        if echo is not None:
            echo(f"{run_dir}: same recipe, but the library's defaults now build a different model: retraining")
        return None
    return latest, int(state.get("step", -1))


def _reuse(run_dir: Path, recipe: Recipe, echo: Callable[[str], None] | None = None) -> tuple[RunResult, Any] | None:
    """A finished run of exactly this recipe (same model, task, training, lr and seed), if
    any: its recorded throughput and its final weights (``final_eval`` is measured again by
    the caller, on the same batches as every other run)."""
    from seqzoo.train import checkpoint as ckpt

    found = _checkpoint_of(run_dir, recipe, echo)
    if found is None or found[1] != recipe.train.steps:
        return None
    model = LanguageModel(recipe)
    ckpt.load_model_weights(found[0], model)
    record = run_dir / RUN_RECORD
    if record.exists():
        return RunResult(**json.loads(record.read_text())), model
    # A run finished without its record (e.g. by `seqzoo train`): throughput from the log;
    # its peak memory is unknown.
    log = run_dir / "metrics.jsonl"
    train_records = [r for r in map(json.loads, log.read_text().splitlines()) if r.get("split") == "train"] if log.exists() else []
    tps = train_records[-1]["tokens_per_s"] if train_records else math.nan
    tokens = recipe.train.steps * recipe.train.batch_size * task_seq_len(recipe)
    return RunResult(lr=recipe.train.lr, out_dir=str(run_dir), wall_time_s=tokens / tps if tps else math.nan,
                     tokens_per_s=tps, seed=recipe.train.seed), model


def mixer_types(recipe: Recipe) -> list[str]:
    spec = recipe.model
    return [spec.mixers[name].get("type", "attention") for name in spec.layer_names() if name in spec.mixers]


def task_seq_len(recipe: Recipe) -> int:
    return build_task(recipe.task).config.seq_len


def _train_one(job: _Job, recipe: Recipe, run_dir: Path, echo: Callable[[str], None]) -> tuple[RunResult, Any]:
    """Train (or, with ``reuse``, continue an interrupted run of exactly this recipe)."""
    lr, seed = recipe.train.lr, recipe.train.seed
    tag = f"[{job.label}] lr={lr:g}" + (f" seed={seed}" if job.seed_dirs else "")
    partial = _checkpoint_of(run_dir, recipe) if job.reuse else None
    if partial is not None:
        echo(f"{tag} resumed at step {partial[1]} in {run_dir}")
        res = train(recipe, out_dir=run_dir, resume=True, progress=job.progress, device=job.device, plot=False)
    else:
        echo(f"{tag} -> {run_dir}")
        (run_dir / RESOLVED_RECORD).unlink(missing_ok=True)  # a fresh run: the old record does not describe it
        res = train(recipe, out_dir=run_dir, overwrite=True, progress=job.progress, device=job.device, plot=False)
    run = RunResult(lr=lr, out_dir=str(run_dir), wall_time_s=res.wall_time_s, tokens_per_s=res.tokens_per_s,
                    peak_memory_mb=res.peak_memory_growth_mb, seed=seed)
    (run_dir / RUN_RECORD).write_text(json.dumps(dataclasses.asdict(run), indent=1))
    (run_dir / RESOLVED_RECORD).write_text(json.dumps(resolved_model(recipe), indent=1))
    return run, res.model


def _run_model(job: _Job, echo: Callable[[str], None] = print) -> ModelResult:
    """Train one model at each learning rate and seed; keep the learning rate with the best
    seed mean, and evaluate its seeds at each test length. Every number in the report comes
    from one evaluation (``eval_batches`` held-out batches per length), so the final column
    and the training-length column are the same measurement."""
    if job.threads is not None:
        torch.set_num_threads(job.threads)
    dev = torch.device(job.device)
    task = build_task(job.recipe.task)
    spec = job.recipe.train
    train_len = task.config.seq_len

    def measure(model: Any, length: int) -> dict[str, float]:
        return evaluate(model.to(dev), task, n_batches=job.eval_batches,
                        batch_size=spec.eval_batch_size or spec.batch_size, device=dev, seq_len=length,
                        autocast=_autocast(spec.precision, dev))

    runs: list[RunResult] = []
    trained: dict[int, Any] = {}
    for lr in job.lrs:
        for seed in job.seeds:
            # The device as train() records it in the checkpoint, so that reuse compares like with like.
            run_recipe = job.recipe.model_copy(update={"train": spec.model_copy(
                update={"lr": lr, "seed": seed, "device": job.device})})
            run_dir = job.run_dir(lr, seed)
            tag = f"[{job.label}] lr={lr:g}" + (f" seed={seed}" if job.seed_dirs else "")
            reused = _reuse(run_dir, run_recipe, echo) if job.reuse else None
            if reused is not None:
                echo(f"{tag} reused from {run_dir}")
                run, model = reused
            else:
                try:
                    run, model = _train_one(job, run_recipe, run_dir, echo)
                except TrainingDiverged as err:
                    runs.append(RunResult(lr=lr, out_dir=str(run_dir), error=f"diverged: {err}", seed=seed))
                    echo(f"{tag} diverged")
                    continue
                except (NotImplementedError, SeqzooError, RuntimeError) as err:
                    runs.append(RunResult(lr=lr, out_dir=str(run_dir), seed=seed,
                                          error=f"{type(err).__name__}: {err}".splitlines()[0]))
                    echo(f"{tag} failed: {runs[-1].error}")
                    continue
            run.final_eval = measure(model, train_len)
            trained[len(runs)] = model
            runs.append(run)
    best = _pick_best(runs, job.headline)
    result = ModelResult(label=job.label, recipe_path=job.recipe_path, params=LanguageModel(job.recipe).num_params(),
                         runs=runs, best=best, family=family(mixer_types(job.recipe)))
    if best is not None:
        chosen = [i for i, r in enumerate(runs) if r.lr == runs[best].lr and r.error is None]
        for length in job.seq_lens:
            evals = [runs[i].final_eval if length == train_len else measure(trained[i], length) for i in chosen]
            result.seed_evals[length] = evals
            keys = evals[0].keys()
            result.by_seq_len[length] = {k: statistics.fmean(e[k] for e in evals) for k in keys}
            result.by_seq_len_std[length] = {k: statistics.stdev([e[k] for e in evals]) if len(evals) > 1 else 0.0
                                             for k in keys}
        if train_len not in result.seed_evals:  # the final column's values, for claims at the training length
            result.seed_evals[train_len] = [runs[i].final_eval for i in chosen]
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
    seeds = effective_seeds(sweep, smoke=smoke)
    todo = [_Job(label=label, recipe_path=recipe_path, recipe=recipe, lrs=tuple(sorted(lrs)), out=out,
                 seeds=tuple(seeds), seed_dirs=sweep.seeds is not None,
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
        from concurrent.futures.process import BrokenProcessPool

        try:
            with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                models = list(pool.map(_run_model, todo))
        except BrokenProcessPool as err:  # a worker was killed (a signal, or out of memory): the pool is gone
            raise SeqzooError(f"{path}: a worker process of --jobs {jobs} died ({err}); the runs that finished "
                              f"are kept in {out}: run the same command with --reuse to continue (or fewer "
                              f"--jobs if memory ran out)") from err
    compare = CompareResult(sweep=sweep, sweep_path=str(path), out_dir=out, headline=headline,
                            metrics=task.metrics, seq_lens=seq_lens, train_seq_len=train_seq_len, models=models,
                            smoke=smoke, device=str(dev), data_fingerprint=fingerprint,
                            wall_time_s=time.perf_counter() - t0, jobs=jobs, seeds=seeds)
    compare.claims = evaluate_claims(compare)
    write_report(compare, task_spec=task_spec, train_spec=train_spec, lrs=sorted(lrs))
    (out / "results.json").write_text(json.dumps(results_json(compare), indent=1))
    return compare


def evaluate_claims(c: CompareResult) -> list[Any]:
    from seqzoo.compare.claims import check

    by_label = {m.label: m for m in c.models}
    labels = list(by_label)
    return [check(claim, labels, lambda label, n, metric: by_label[label].values(n, metric), headline=c.headline,
                  train_len=c.train_seq_len, higher_is_better=higher_is_better)
            for claim in c.sweep.claims]


def results_json(c: CompareResult) -> dict[str, Any]:
    return {"sweep": c.sweep_path, "smoke": c.smoke, "device": c.device, "headline": c.headline,
            "train_seq_len": c.train_seq_len, "data_fingerprint": c.data_fingerprint,
            "torch": torch.__version__, "python": platform.python_version(), "wall_time_s": c.wall_time_s,
            "jobs": c.jobs, "seeds": c.seeds,
            "claims": [{"claim": r.claim.claim, "source": r.claim.source, "kind": r.claim.kind, "holds": r.holds,
                        "measured": r.measured} for r in c.claims],
            "models": [dataclasses.asdict(m) for m in c.models]}
