"""Refuse, before allocating, a model or batch that cannot fit on the device.

The estimate is a lower bound: fp32 weights (plus gradients and AdamW's two moments when
training), the logits of one micro-batch (and their gradient), and the residual stream each
layer keeps for the backward pass. A run refused here could never have run; one that passes
may still run out of memory later, which the CLI then reports in one line.
Parameters are counted on the "meta" device: shapes only, no memory.
"""

from __future__ import annotations

import os
import resource

import torch

from seqzoo.errors import SeqzooError
from seqzoo.recipes import Recipe

GiB = 2**30


def count_parameters(recipe: Recipe) -> int:
    from seqzoo.models.lm import LanguageModel

    with torch.device("meta"):
        return LanguageModel(recipe).num_params()


def device_memory_bytes(device: torch.device) -> int | None:
    """What the device can hold at most: CUDA's total memory; on CPU the physical memory,
    or less under an address-space limit (``ulimit -v``). None when unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type != "cpu":
        return None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        try:
            with open("/proc/self/statm") as f:
                mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            mapped = 0
        total = min(total, max(0, soft - mapped))
    return total


def lower_bound_bytes(recipe: Recipe, *, params: int, seq_len: int, train_batch: int | None, eval_batch: int) -> int:
    """Weights (+ gradients and AdamW moments when training) and the larger of one training
    micro-batch (logits, their gradient, one residual stream per layer) and one eval batch."""
    def batch(size: int, training: bool) -> int:
        tokens = size * seq_len
        logits = tokens * recipe.vocab_size() * 4
        residual = tokens * recipe.model.d_model * 4
        return 2 * logits + residual * recipe.model.n_layers if training else logits + residual

    weights = params * 4 * (4 if train_batch is not None else 1)
    return weights + max(batch(eval_batch, False), batch(train_batch, True) if train_batch is not None else 0)


def check_fits(recipe: Recipe, *, device: torch.device, seq_len: int, eval_batch: int,
               train_batch: int | None = None, what: str) -> None:
    """Raise one line naming what to shrink when even the lower bound exceeds the device."""
    available = device_memory_bytes(device)
    if available is None:
        return
    params = count_parameters(recipe)
    need = lower_bound_bytes(recipe, params=params, seq_len=seq_len, train_batch=train_batch, eval_batch=eval_batch)
    if need > available:
        training = ", gradients and AdamW state" if train_batch is not None else ""
        raise SeqzooError(f"{what}: needs at least {need / GiB:,.1f} GiB ({params:,} parameters{training}, "
                          f"batches of {max(eval_batch, train_batch or 0)} x {seq_len} tokens), more than the "
                          f"{available / GiB:,.1f} GiB of {device}; reduce model.d_model, model.n_layers, "
                          f"the batch size or the sequence length")
