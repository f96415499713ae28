"""Retention (Sun et al. 2023, "Retentive Network: A Successor to Transformer for Large
Language Models", sec. 2.1-2.2).

Per head h, with the fixed decay gamma_h = 1 - 2^(-5-h) (h = 0 .. H-1, paper sec. 2.2):

    recurrent (eq. 6):  S_t = gamma_h S_{t-1} + k_t^T v_t,   o_t = (scale * q_t) S_t
    parallel  (eq. 5):  O = (scale * Q K^T ⊙ D) V,            D_ts = gamma^(t-s) for s <= t
    chunkwise (eq. 7):  intra-chunk parallel form + the state carried across chunks

Retention is scalar-gated linear attention with a constant gate log gamma_h, so the
recurrent and chunked forms are those of ``seqzoo.ops.gla`` (simple_gla). Layout
(B, T, H, D), state (B, H, K, V); ``scale`` defaults to K^-1/2 (as flash-linear-attention).
Rotary / xPos on q, k belongs to the mixer, not to the op.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from seqzoo.ops.chunking import decay_matrix
from seqzoo.ops.gla import gla_step, simple_gla_chunked, simple_gla_recurrent


def retention_log_decay(n_heads: int, *, device: torch.device | str | None = None,
                        dtype: torch.dtype = torch.float64) -> Tensor:
    """log gamma_h = log(1 - 2^(-5-h)) for h = 0 .. H-1, shape (H,)."""
    return torch.tensor([math.log1p(-(2.0 ** (-5 - h))) for h in range(n_heads)], device=device, dtype=dtype)


def _gates(q: Tensor) -> Tensor:
    b, t, h, _ = q.shape
    dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    return retention_log_decay(h, device=q.device, dtype=dtype).expand(b, t, h)  # (B, T, H)


def retention_step(q: Tensor, k: Tensor, v: Tensor, state: Tensor, *,
                   scale: float | None = None) -> tuple[Tensor, Tensor]:
    """One token: q, k: (B, H, K), v: (B, H, V), state (B, H, K, V) -> o (B, H, V), new state."""
    g = retention_log_decay(q.shape[1], device=q.device, dtype=q.dtype).expand(q.shape[0], -1)  # (B, H)
    return gla_step(q, k, v, g, state, scale=scale)


def retention_recurrent(q: Tensor, k: Tensor, v: Tensor, *, initial_state: Tensor | None = None,
                        output_final_state: bool = False,
                        scale: float | None = None) -> tuple[Tensor, Tensor | None]:
    """Per-token loop (paper eq. 6)."""
    return simple_gla_recurrent(q, k, v, _gates(q), initial_state=initial_state,
                                output_final_state=output_final_state, scale=scale)


def retention_parallel(q: Tensor, k: Tensor, v: Tensor, *, initial_state: Tensor | None = None,
                       output_final_state: bool = False,
                       scale: float | None = None) -> tuple[Tensor, Tensor | None]:
    """Parallel form (paper eq. 5), O(T^2): (Q K^T ⊙ D) V, plus the decayed initial state."""
    t = q.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    log_gamma = retention_log_decay(q.shape[2], device=q.device, dtype=q.dtype)  # (H,)
    b = log_gamma[:, None] * torch.arange(1, t + 1, device=q.device, dtype=q.dtype)  # (H, T): log gamma^(t+1)
    scores = torch.einsum("bthk,bshk->bhts", q * scale, k) * decay_matrix(b)  # (B, H, T, T)
    o = torch.einsum("bhts,bshv->bthv", scores, v)  # (B, T, H, V)
    final = None
    if initial_state is not None:
        o = o + torch.einsum("bthk,bhkv->bthv", q * scale * b.T.exp()[None, :, :, None], initial_state.to(q.dtype))
    if output_final_state:
        tail = (b[:, -1:] - b).exp() if t else b  # (H, T): gamma^(T-1-s)
        final = torch.einsum("bshk,bshv,hs->bhkv", k, v, tail)  # (B, H, K, V)
        if initial_state is not None:
            final = final + initial_state.to(q.dtype) * (log_gamma * t).exp()[None, :, None, None]
    return o, final


def retention(q: Tensor, k: Tensor, v: Tensor, *, chunk_size: int = 64, initial_state: Tensor | None = None,
              output_final_state: bool = False, scale: float | None = None) -> tuple[Tensor, Tensor | None]:
    """Multi-scale retention, chunkwise form (paper eq. 7). q, k: (B, T, H, K), v: (B, T, H, V),
    initial_state: (B, H, K, V). Returns (o: (B, T, H, V), final state or None)."""
    return simple_gla_chunked(q, k, v, _gates(q), chunk_size=chunk_size, initial_state=initial_state,
                              output_final_state=output_final_state, scale=scale)
