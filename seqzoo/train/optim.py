"""AdamW with decoupled weight decay on matrices only, and warmup + cosine decay."""

from __future__ import annotations

import math

import torch
from torch import nn

from seqzoo.recipes import TrainSpec


def build_optimizer(model: nn.Module, spec: TrainSpec) -> torch.optim.AdamW:
    """Weight decay on weight matrices; none on norms, biases, gains, or 1-D parameters
    such as decay rates and persistent-token scales (standard practice, e.g. nanoGPT)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": spec.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=spec.lr, betas=spec.betas, foreach=False)


def lr_at(step: int, spec: TrainSpec) -> float:
    """Linear warmup over ``warmup_steps``, then cosine down to ``min_lr_ratio * lr``."""
    if spec.warmup_steps and step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    span = max(1, spec.steps - spec.warmup_steps)
    progress = min(1.0, (step - spec.warmup_steps) / span)
    floor = spec.lr * spec.min_lr_ratio
    return floor + 0.5 * (spec.lr - floor) * (1 + math.cos(math.pi * progress))
