"""Shared helpers of the chunked (chunkwise-parallel) forms of linear-attention ops.

A chunked op cuts the time axis into N chunks of C tokens (the last one zero-padded), does
the quadratic work inside each chunk with matmuls, and passes a (K, V) state from chunk to
chunk (Katharopoulos et al. 2020; Sun et al. 2023, sec. 2.2; Yang et al. 2024, sec. 3).
Padding convention: padded positions carry zero keys / values / queries and a log gate of 0
(no decay), so they change neither the real outputs nor the final state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor


def pad_time(x: Tensor, chunk_size: int) -> Tensor:
    """Zero-pad dim 1 (time) of x: (B, T, ...) up to a multiple of ``chunk_size``."""
    pad = -x.shape[1] % chunk_size
    if pad == 0:
        return x
    # F.pad counts dims from the last one; dim 1 sits after (ndim - 2) trailing dims.
    return F.pad(x, (0, 0) * (x.ndim - 2) + (0, pad))


def to_chunks(x: Tensor, chunk_size: int) -> Tensor:
    """(B, T, H, ...) -> (B, H, N, C, ...), zero-padding T to a multiple of C. Contiguous:
    batched matmuls over a permuted view are several times slower on CPU."""
    x = pad_time(x, chunk_size)
    return rearrange(x, "b (n c) h ... -> b h n c ...", c=chunk_size).contiguous()  # (B, H, N, C, ...)


def from_chunks(x: Tensor, length: int) -> Tensor:
    """(B, H, N, C, ...) -> (B, T, H, ...), dropping the padding beyond ``length``."""
    return rearrange(x, "b h n c ... -> b (n c) h ...")[:, :length]  # (B, T, H, ...)


def causal_mask(size: int, *, device: torch.device | None = None, strict: bool = False) -> Tensor:
    """(C, C) bool, True where column j may feed row i: j <= i (j < i if ``strict``)."""
    return torch.ones(size, size, dtype=torch.bool, device=device).tril(-1 if strict else 0)


def decay_matrix(b: Tensor) -> Tensor:
    """Causal decay between positions of a chunk from in-chunk cumulative log gates.

    b: (..., C), b_i = sum_{s <= i} g_s. Returns (..., C, C) with exp(b_i - b_j) for j <= i
    and 0 above the diagonal. The mask is applied to the exponent *before* exp, so a large
    positive b_i - b_j above the diagonal never overflows (and its gradient is exactly 0).
    """
    diff = b[..., :, None] - b[..., None, :]  # (..., C, C)
    mask = causal_mask(b.shape[-1], device=b.device)
    return diff.masked_fill(~mask, float("-inf")).exp()


def scan_chunk_states(decay: Tensor, update: Tensor, initial_state: Tensor | None) -> tuple[Tensor, Tensor]:
    """The only sequential part of a chunked op: S_{n+1} = decay_n * S_n + update_n.

    decay: (B, H, N, K, 1) or (B, H, N, 1, 1) multiplicative decay over chunk n (already
    exponentiated); update: (B, H, N, K, V) the chunk's own contribution.
    Returns the states entering each chunk, (B, H, N, K, V), and the final state (B, H, K, V).
    """
    state = (initial_state.to(update.dtype) if initial_state is not None
             else update.new_zeros(update.shape[:2] + update.shape[3:]))
    entering = []
    for n in range(update.shape[2]):
        entering.append(state)
        state = decay[:, :, n] * state + update[:, :, n]
    if not entering:  # T = 0: no chunks, the state passes through
        return update, state
    return torch.stack(entering, dim=2), state
