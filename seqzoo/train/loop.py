"""One training loop for every model: AdamW, warmup + cosine, gradient clipping and
accumulation, bf16 autocast on GPU (the same code path in fp32 on CPU), seeds, periodic
eval, atomic checkpoints, exact resume, JSONL metrics, a progress bar and PNG curves.
Under ``torchrun`` the same loop runs data-parallel (DDP, or FSDP for large recipes; see
``seqzoo.train.distributed``): each rank trains on its shard of the global batch and rank 0
alone logs and checkpoints.

Exact resume: batches are a pure function of (task seed, step) and the learning rate a pure
function of the step, so a run resumed from step s sees exactly the batches and learning
rates an uninterrupted run would have seen after s.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from seqzoo.errors import SeqzooError
from seqzoo.models.lm import LanguageModel
from seqzoo.recipes import Recipe, recipe_from_dict
from seqzoo.runs import write_run_recipe
from seqzoo.tasks import IGNORE, build_task
from seqzoo.train import checkpoint as ckpt
from seqzoo.train import distributed as dist
from seqzoo.train.compile import prepare_model
from seqzoo.train.evaluate import evaluate, token_loss
from seqzoo.train.loggers import build_loggers, module_telemetry
from seqzoo.train.memory_budget import check_fits
from seqzoo.train.metrics_log import MetricsLog, plot_curves
from seqzoo.train.optim import build_optimizer, lr_at
from seqzoo.train.resume_check import check_same_recipe
from seqzoo.train.run_lock import RunLock

PARALLEL_ENV = "SEQZOO_PARALLEL"  # auto | ddp | fsdp: how `torchrun` runs are parallelised


class TrainingDiverged(SeqzooError):
    pass


@dataclasses.dataclass
class TrainResult:
    out_dir: Path
    steps: int
    final_eval: dict[str, float]
    first_eval: dict[str, float]
    wall_time_s: float
    tokens_per_s: float
    peak_memory_mb: float
    sample: str | None = None
    plot: Path | None = None
    # Peak memory the run itself added: CUDA peak allocation, or on CPU the peak growth of
    # the resident set over its size when training started (sampled).
    peak_memory_growth_mb: float = float("nan")
    model: nn.Module | None = dataclasses.field(default=None, repr=False)
    parallel: str = "none"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise SeqzooError(f"--device: expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SeqzooError(f"--device: {name!r} requested but CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SeqzooError(f"--device: {name!r} requested but this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SeqzooError(f"--device: {name!r} requested but MPS is not available on this machine")
    return device


def _autocast(precision: str, device: torch.device):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return None


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    except ImportError:  # pragma: no cover - non-POSIX
        return float("nan")


class _RSSPeak:
    """Samples this process's resident set (Linux /proc) in a daemon thread; ru_maxrss
    only ever grows over the whole process, so it cannot tell two runs in one process apart."""

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval = interval_s
        _release_free_memory()  # what earlier runs freed should not hide this run's growth
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        if math.isfinite(self.start):  # /proc readable
            self._thread.start()

    @staticmethod
    def _rss() -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, ValueError, IndexError):
            return float("nan")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._rss())

    def stop(self) -> float:
        """Peak growth in MiB over the size at start (stopping twice is harmless)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.peak = max(self.peak, self._rss())
        return self.peak - self.start


def _release_free_memory() -> None:
    """Return freed heap pages to the OS (glibc's malloc_trim), so the resident set reflects
    live memory; a no-op elsewhere."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _State:
    """Stands in for a module / optimiser whose full state dict was gathered already."""

    def __init__(self, state: dict[str, Any]) -> None:
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        return self._state


def train(recipe: Recipe, *, out_dir: str | Path | None = None, steps: int | None = None,
          device: str | None = None, resume: bool = False, overwrite: bool = False,
          allow_recipe_change: bool = False, progress: bool = True,
          on_step: Callable[[int, dict[str, Any]], None] | None = None,
          parallel: str | None = None, plot: bool = True) -> TrainResult:
    """Train ``recipe``; ``steps`` / ``device`` override the recipe's train settings (validated
    like the recipe); ``plot=False`` skips curves.png (``seqzoo compare`` draws its own).

    One writer per ``out_dir`` (``run_lock``). ``resume`` continues the latest checkpoint of
    exactly this recipe (``resume_check``; ``allow_recipe_change`` continues a changed one)
    and is an error that changes nothing when there is nothing to continue.

    Launched by ``torchrun`` (WORLD_SIZE > 1) it trains data-parallel: ``parallel`` (or the
    SEQZOO_PARALLEL environment variable) picks "ddp", "fsdp" or "auto" (FSDP for recipes
    above ``distributed.FSDP_MIN_PARAMS`` parameters). Every rank must see the same ``out_dir``.
    """
    overrides: dict[str, Any] = {}
    if steps is not None:
        overrides["steps"] = steps
    if device is not None:
        overrides["device"] = device
    if overrides:
        data = recipe.model_dump()
        data["train"].update(overrides)
        recipe = recipe_from_dict(data, path="command line")
    if resume and overwrite:
        raise SeqzooError("--resume and --overwrite: give one (continue the run, or delete it and start afresh)")
    parallel = parallel or os.environ.get(PARALLEL_ENV, "auto")
    if parallel not in ("auto", "ddp", "fsdp"):
        raise SeqzooError(f"{PARALLEL_ENV}: expected auto, ddp or fsdp, got {parallel!r}")
    out = Path(out_dir or Path("runs") / recipe.name)
    if resume:
        _resumable(out)  # before anything is created or locked
    info, dev = dist.init(resolve_device(recipe.train.device))
    rss = _RSSPeak() if dev.type == "cpu" else None
    lock = RunLock(out) if info.is_main else None
    try:
        if lock is not None:
            lock.acquire()
        return _train(recipe, info=info, dev=dev, out_dir=out, resume=resume, overwrite=overwrite,
                      allow_recipe_change=allow_recipe_change, progress=progress, on_step=on_step,
                      parallel=parallel, plot=plot, rss=rss)
    finally:
        if lock is not None:
            lock.release()
        if rss is not None:
            rss.stop()
        dist.shutdown(info)


def _resumable(out: Path) -> Path:
    existing = ckpt.latest_checkpoint(out)
    if existing is None:
        raise SeqzooError(f"{out}: --resume: nothing to resume (no complete checkpoint in {out / 'checkpoints'}); "
                          f"nothing was changed")
    return existing


def _train(recipe: Recipe, *, info: dist.DistInfo, dev: torch.device, out_dir: Path,
           resume: bool, overwrite: bool, allow_recipe_change: bool, progress: bool,
           on_step: Callable[[int, dict[str, Any]], None] | None,
           parallel: str, plot: bool, rss: _RSSPeak | None) -> TrainResult:
    spec = recipe.train
    out = out_dir
    main = info.is_main
    local_batch = spec.batch_size // info.world_size
    if spec.batch_size % info.world_size or local_batch % spec.grad_accum:
        raise SeqzooError(f"train.batch_size={spec.batch_size}: must split evenly into {info.world_size} "
                          f"rank(s) × grad_accum={spec.grad_accum} micro-batches")

    existing = None if overwrite else ckpt.latest_checkpoint(out)  # looked at again, under the lock
    if overwrite:
        dist.barrier(info)  # every rank has started before rank 0 removes the old run
        if main:
            if (out / "checkpoints").exists():
                shutil.rmtree(out / "checkpoints")
            (out / "metrics.jsonl").unlink(missing_ok=True)
    elif existing is not None and not resume:
        raise SeqzooError(f"{out}: holds a checkpoint already; pass --resume to continue it or "
                          f"--overwrite to start afresh (or choose another --out)")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.clean_stale_temps(out)  # we hold the lock: no other write is in flight
    dist.barrier(info)

    eval_bs = spec.eval_batch_size or spec.batch_size
    task = build_task(recipe.task)
    check_fits(recipe, device=dev, seq_len=task.config.seq_len, train_batch=local_batch // spec.grad_accum,
               eval_batch=eval_bs, what=f"recipe {recipe.name}")
    resuming = resume
    if resuming:
        existing = existing or _resumable(out)
        state = ckpt.read_state(existing)
        change = check_same_recipe(state["recipe"], recipe, state_path=str(existing / "state.json"),
                                   allow_change=allow_recipe_change)
        if change is not None and main:
            print(f"warning: resuming {existing} with a changed recipe: {change}", file=sys.stderr)
        if state["step"] >= spec.steps:
            raise SeqzooError(f"{existing}: at step {state['step']}, the run's train.steps={spec.steps}; nothing "
                              f"to resume (to train further, raise --steps with --allow-recipe-change)")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    torch.manual_seed(spec.seed)
    model = LanguageModel(recipe).to(dev)
    if resuming:
        ckpt.load_model_weights(existing, model)  # before sharding: every rank loads the full weights
    strategy = dist.resolve_strategy(parallel, model) if info.enabled else "ddp"
    wrapped = dist.wrap(model, info, dev, strategy)
    fsdp = info.enabled and strategy == "fsdp"
    optimizer = build_optimizer(model, spec)
    log = MetricsLog(out / "metrics.jsonl") if main else None
    start = 0
    if resuming:
        if fsdp:
            dist.load_full_state(model, optimizer, ckpt.read_optimizer_state(existing, optimizer), info)
            ckpt.restore_rng(existing)
        else:
            ckpt.load_training_state(existing, optimizer)
        start = state["step"]
        if log is not None:
            log.truncate_after(start)
    elif log is not None:
        log.truncate_after(-1)  # a fresh start: drop records a run killed before its first checkpoint left
    if main:  # only once the checkpoint has loaded: a refused resume changes nothing
        write_run_recipe(out, recipe)
    prepare_model(model, spec, log=log, step=start)  # train.compile; the backends go into the log

    logger = build_loggers(spec.log, jsonl=log, out_dir=out, start_step=start, name=recipe.name,
                           config=recipe.model_dump(mode="json")) if log is not None else None
    autocast = _autocast(spec.precision, dev)
    micro = local_batch // spec.grad_accum
    recipe_json = recipe.model_dump(mode="json")

    def run_eval(step: int) -> dict[str, float]:
        # Every rank evaluates the same fixed set (FSDP needs every rank in each forward).
        metrics = evaluate(model, task, n_batches=spec.eval_batches, batch_size=eval_bs, device=dev,
                           autocast=autocast)
        if logger is not None:
            logger.log({"step": step, "split": "eval", **metrics})
        bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
        if bad:  # a failure, never a result; the checkpoint of this step is not written
            raise TrainingDiverged(f"the held-out {', '.join(f'{k}={v}' for k, v in bad.items())} at step {step}; "
                                   f"training stopped. Last good checkpoint: {ckpt.latest_checkpoint(out) or 'none yet'}")
        return metrics

    def save(step: int, last_eval: dict[str, float]) -> None:
        weights, opt_state = dist.full_state_dicts(wrapped, optimizer, info, strategy)
        if main:
            ckpt.save_checkpoint(out, step=step, model=_State(weights), optimizer=_State(opt_state),
                                 recipe=recipe_json, extra={"eval": last_eval})
        dist.barrier(info)

    first_eval = run_eval(start) if start == 0 else {}
    t0 = time.perf_counter()
    tokens = 0
    bar = tqdm(range(start, spec.steps), initial=start, total=spec.steps, disable=not (progress and main),
               desc=recipe.name, dynamic_ncols=True, mininterval=1.0)
    last_eval: dict[str, float] = first_eval
    wrapped.train()
    for step in bar:
        lr = lr_at(step, spec)
        for group in optimizer.param_groups:
            group["lr"] = lr
        inputs, targets = task.train_batch(step, spec.batch_size, rank=info.rank, world_size=info.world_size)
        # Normalise by the target count of the whole global batch, so that summing over
        # micro-batches and ranks gives exactly the mean loss of one big batch.
        n_targets = dist.all_reduce_sum((targets != IGNORE).sum(), info).clamp(min=1)
        loss_total = 0.0
        for i in range(spec.grad_accum):
            x = inputs[i * micro:(i + 1) * micro].to(dev)
            y = targets[i * micro:(i + 1) * micro].to(dev)
            last_micro = i == spec.grad_accum - 1
            if fsdp:
                wrapped.set_requires_gradient_sync(last_micro)
            sync = wrapped.no_sync() if info.enabled and not fsdp and not last_micro else nullcontext()
            with sync:
                with autocast if autocast is not None else nullcontext():
                    logits, _ = wrapped(x)
                loss = token_loss(logits, y, reduction="sum") / n_targets.to(dev)
                # DDP / FSDP average gradients over ranks; the loss is a sum over ranks.
                (loss * info.world_size if info.enabled else loss).backward()
            loss_total += loss.item()
        if info.enabled:
            loss_total = dist.all_reduce_sum(torch.tensor(loss_total, dtype=torch.float64), info).item()
        if not math.isfinite(loss_total):
            _diverged(f"loss became {loss_total}", step, out)
        grad_norm = float("nan")
        if spec.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
            grad_norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()
            if not math.isfinite(grad_norm):
                _diverged(f"the gradient norm became {grad_norm}", step, out)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += inputs.numel() * info.world_size
        done = step + 1
        if done % spec.log_every == 0 or done == spec.steps:
            elapsed = time.perf_counter() - t0
            record = {"step": done, "split": "train", "loss": loss_total, "lr": lr, "grad_norm": grad_norm,
                      "tokens_per_s": tokens / max(elapsed, 1e-9), "memory_mb": _memory_so_far_mb(dev, rss),
                      **module_telemetry(model)}
            if spec.grad_clip == 0:  # not computed without clipping: absent, not a NaN that reads as a failure
                del record["grad_norm"]
            if logger is not None:
                logger.log(record)
            bar.set_postfix(loss=f"{loss_total:.3f}", refresh=False)
            if on_step is not None:
                on_step(done, record)
        if done % spec.eval_every == 0 or done == spec.steps:
            last_eval = run_eval(done)
            headline = task.metrics[0]
            bar.set_postfix(loss=f"{loss_total:.3f}", **{f"eval_{headline}": f"{last_eval[headline]:.3f}"})
        if done % spec.ckpt_every == 0 or done == spec.steps:
            save(done, last_eval)
    bar.close()
    if logger is not None:
        logger.close()
    wall = time.perf_counter() - t0
    growth = rss.stop() if rss is not None else torch.cuda.max_memory_allocated(dev) / 2**20
    curves = plot_curves(log.records(), out / "curves.png", title=recipe.name) if log is not None and plot else None
    sample = None
    if main and not fsdp and hasattr(task, "decode") and spec.sample_tokens:
        sample = sample_text(model, task, spec.sample_tokens, dev)
    return TrainResult(out_dir=out, steps=spec.steps, final_eval=last_eval, first_eval=first_eval,
                       wall_time_s=wall, tokens_per_s=tokens / max(wall, 1e-9),
                       peak_memory_mb=_peak_memory_mb(dev), sample=sample, plot=curves,
                       peak_memory_growth_mb=growth, model=model,
                       parallel=strategy if info.enabled else "none")


def _diverged(what: str, step: int, out: Path) -> None:
    # Raised before optimizer.step(): no weight ever sees the bad update, and the last
    # checkpoint on disk is the last good state.
    last = ckpt.latest_checkpoint(out)
    raise TrainingDiverged(f"{what} at step {step}; training stopped before the update. "
                           f"Last good checkpoint: {last or 'none yet'} (resume with --resume, "
                           f"e.g. after lowering train.lr)")


def sample_text(model: LanguageModel, task, n_tokens: int, device: torch.device, *,
                prompt: str = "def ", temperature: float = 0.8, top_k: int = 40, seed: int = 0) -> str:
    """Text a text task's model (one with ``task.encode`` / ``task.decode``) writes after ``prompt``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor(task.encode(prompt), device=device)[None]
    out = model.generate(ids, n_tokens, temperature=temperature, top_k=top_k, generator=gen)
    return task.decode(out[0].tolist())


def _memory_so_far_mb(device: torch.device, rss: _RSSPeak | None) -> float:
    """Peak memory so far: CUDA's peak allocation, or the sampled peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return max(rss.peak, rss._rss()) if rss is not None else float("nan")
