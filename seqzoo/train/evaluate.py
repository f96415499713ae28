"""Held-out evaluation: mean loss (nats per target token) and accuracy over a fixed set."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seqzoo.errors import SeqzooError
from seqzoo.tasks.base import IGNORE, Task


def token_loss(logits: torch.Tensor, targets: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over positions whose target is not IGNORE. logits: (B, T, V)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                           reduction=reduction)


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, *, n_batches: int, batch_size: int, device: torch.device,
             seq_len: int | None = None, autocast: torch.autocast | None = None) -> dict[str, float]:
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for inputs, targets in task.eval_batches(n_batches, batch_size, seq_len=seq_len):
        inputs, targets = inputs.to(device), targets.to(device)
        if autocast is not None:
            with autocast:
                logits, _ = model(inputs)
        else:
            logits, _ = model(inputs)
        mask = targets != IGNORE
        loss_sum += token_loss(logits, targets, reduction="sum").item()
        correct += (logits.argmax(-1).eq(targets) & mask).sum().item()
        count += mask.sum().item()
    model.train(was_training)
    if count == 0:  # a mean over nothing would read as a perfect 0.0
        raise SeqzooError(f"evaluation of task {task.name!r} saw no target tokens "
                          f"({n_batches} batch(es) of {batch_size}); expected at least one")
    return task.report(loss_sum / count, correct / count)
