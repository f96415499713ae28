"""One training loop for every model: AdamW, warmup + cosine, gradient clipping and
accumulation, bf16 autocast on GPU, seeds, periodic eval, atomic checkpoints, exact resume,
JSONL metrics, a progress bar and PNG curves.

Exact resume: batches are a pure function of (task seed, step) and the learning rate a pure
function of the step, so a run resumed from step s sees exactly the batches and learning
rates an uninterrupted run would have seen after s.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from seqzoo.errors import SeqzooError
from seqzoo.models.lm import LanguageModel
from seqzoo.recipes import Recipe
from seqzoo.tasks import build_task
from seqzoo.train import checkpoint as ckpt
from seqzoo.train.evaluate import evaluate, token_loss
from seqzoo.train.metrics_log import MetricsLog, plot_curves
from seqzoo.train.optim import build_optimizer, lr_at


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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SeqzooError(f"--device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SeqzooError(f"--device: {name!r} requested but CUDA is not available on this machine")
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


def train(recipe: Recipe, *, out_dir: str | Path | None = None, steps: int | None = None,
          device: str | None = None, resume: bool = False, overwrite: bool = False,
          progress: bool = True, on_step: Callable[[int, dict[str, Any]], None] | None = None) -> TrainResult:
    """Train ``recipe``; ``steps`` / ``device`` override the recipe's train settings."""
    overrides: dict[str, Any] = {}
    if steps is not None:
        overrides["steps"] = steps
    if device is not None:
        overrides["device"] = device
    if overrides:
        recipe = recipe.model_copy(update={"train": recipe.train.model_copy(update=overrides)})
    spec = recipe.train
    out = Path(out_dir or Path("runs") / recipe.name)
    dev = resolve_device(spec.device)

    existing = ckpt.latest_checkpoint(out)
    if existing is not None and not resume:
        if not overwrite:
            raise SeqzooError(f"{out}: holds a checkpoint already; pass --resume to continue it or "
                              f"--overwrite to start afresh (or choose another --out)")
        shutil.rmtree(out / "checkpoints")
        (out / "metrics.jsonl").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(spec.seed)
    task = build_task(recipe.task)
    model = LanguageModel(recipe).to(dev)
    optimizer = build_optimizer(model, spec)
    log = MetricsLog(out / "metrics.jsonl")
    start = 0
    if resume and existing is not None:
        ckpt.load_model_weights(existing, model)
        state = ckpt.load_training_state(existing, optimizer)
        start = state["step"]
        log.truncate_after(start)
    elif resume:
        log.truncate_after(-1)

    autocast = _autocast(spec.precision, dev)
    eval_bs = spec.eval_batch_size or spec.batch_size
    micro = spec.batch_size // spec.grad_accum
    recipe_json = recipe.model_dump(mode="json")

    def run_eval(step: int) -> dict[str, float]:
        metrics = evaluate(model, task, n_batches=spec.eval_batches, batch_size=eval_bs, device=dev,
                           autocast=autocast)
        log.append({"step": step, "split": "eval", **metrics})
        return metrics

    first_eval = run_eval(start) if start == 0 else {}
    t0 = time.perf_counter()
    tokens = 0
    bar = tqdm(range(start, spec.steps), initial=start, total=spec.steps, disable=not progress,
               desc=recipe.name, dynamic_ncols=True, mininterval=1.0)
    last_eval: dict[str, float] = first_eval
    model.train()
    for step in bar:
        lr = lr_at(step, spec)
        for group in optimizer.param_groups:
            group["lr"] = lr
        inputs, targets = task.train_batch(step, spec.batch_size)
        n_targets = (targets != -100).sum().clamp(min=1)
        loss_total = 0.0
        for i in range(spec.grad_accum):
            x = inputs[i * micro:(i + 1) * micro].to(dev)
            y = targets[i * micro:(i + 1) * micro].to(dev)
            with autocast if autocast is not None else nullcontext():
                logits, _ = model(x)
            # Sum over the micro-batch, divided by the global count: accumulation == one big batch.
            loss = token_loss(logits, y, reduction="sum") / n_targets.to(dev)
            loss.backward()
            loss_total += loss.item()
        if not math.isfinite(loss_total):
            last = ckpt.latest_checkpoint(out)
            raise TrainingDiverged(f"loss became {loss_total} at step {step}; training stopped. "
                                   f"Last good checkpoint: {last or 'none yet'}")
        grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip).item()
                     if spec.grad_clip > 0 else float("nan"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += inputs.numel()
        done = step + 1
        if done % spec.log_every == 0 or done == spec.steps:
            elapsed = time.perf_counter() - t0
            record = {"step": done, "split": "train", "loss": loss_total, "lr": lr, "grad_norm": grad_norm,
                      "tokens_per_s": tokens / max(elapsed, 1e-9)}
            log.append(record)
            bar.set_postfix(loss=f"{loss_total:.3f}", refresh=False)
            if on_step is not None:
                on_step(done, record)
        if done % spec.eval_every == 0 or done == spec.steps:
            last_eval = run_eval(done)
            headline = task.metrics[0]
            bar.set_postfix(loss=f"{loss_total:.3f}", **{f"eval_{headline}": f"{last_eval[headline]:.3f}"})
        if done % spec.ckpt_every == 0 or done == spec.steps:
            ckpt.save_checkpoint(out, step=done, model=model, optimizer=optimizer, recipe=recipe_json,
                                 extra={"eval": last_eval})
    bar.close()
    wall = time.perf_counter() - t0
    plot = plot_curves(log.records(), out / "curves.png", title=recipe.name)
    sample = None
    if task.name == "bytes" and spec.sample_tokens:
        sample = sample_text(model, task, spec.sample_tokens, dev)
    return TrainResult(out_dir=out, steps=spec.steps, final_eval=last_eval, first_eval=first_eval,
                       wall_time_s=wall, tokens_per_s=tokens / max(wall, 1e-9),
                       peak_memory_mb=_peak_memory_mb(dev), sample=sample, plot=plot)


def sample_text(model: LanguageModel, task, n_tokens: int, device: torch.device, *,
                prompt: bytes = b"def ", temperature: float = 0.8, top_k: int = 40, seed: int = 0) -> str:
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor(list(prompt), device=device)[None]
    out = model.generate(ids, n_tokens, temperature=temperature, top_k=top_k, generator=gen)
    return bytes(out[0].tolist()).decode("utf-8", errors="replace")
