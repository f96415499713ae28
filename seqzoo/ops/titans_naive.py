"""Readable per-token reference of the Titans memory (paper eq. 13-14, chunked gradients of
eq. 16-18): a plain loop whose gradients come from autograd (``torch.func.grad``), vmapped
over batch and heads. Slow; used by the tests to check ``seqzoo.ops.titans.titans_memory``.
Same signature, options and state as the chunked op.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torch.func import grad, vmap

from seqzoo.ops.titans import ACTIVATIONS, TitansState, init_state


def _memory(weights: tuple[Tensor, ...], x: Tensor, *, activation: str, residual: bool, bias: bool,
            ln: tuple[Tensor, Tensor] | None, ln_eps: float) -> Tensor:
    """M(x) for one head: weights[l]: (d_in[+1], d_out), x: (d_0,) -> (d_L,)."""
    act = ACTIVATIONS[activation][0]
    h = x
    for layer, w in enumerate(weights):
        h_in = torch.cat([h, h.new_ones(1)]) if bias else h
        h = h_in @ w
        if layer < len(weights) - 1:
            h = act(h)
    if ln is not None:
        h = torch.nn.functional.layer_norm(h, h.shape, ln[0], ln[1], ln_eps)
    return x + h if residual else h


def titans_memory_naive(q: Tensor, k: Tensor, v: Tensor, theta: Tensor, eta: Tensor, alpha: Tensor,
                        weights: Sequence[Tensor] | None, *, chunk_size: int, activation: str = "silu",
                        read: str = "token", initial_state: TitansState | None = None,
                        output_final_state: bool = False, residual: bool = False, bias: bool = False,
                        ln: tuple[Tensor, Tensor] | None = None, ln_eps: float = 1e-6,
                        max_grad_norm: float | None = None) -> tuple[Tensor, TitansState | None]:
    """Token loop: u_t = grad ||M_start(k_t) - v_t||^2 (soft-clipped to a norm below
    ``max_grad_norm`` if given), S_t = eta_t S_{t-1} - theta_t u_t,
    M_t = (1 - alpha_t) M_{t-1} + S_t, y_t = M_t(q_t) (or M_start(q_t)); every ``chunk_size``
    tokens the start weights (where gradients are taken) move to M_t."""
    state = initial_state if initial_state is not None else init_state(weights)
    start, cur, mom, pos = (list(state.start), list(state.weights), list(state.momentum), state.pos)

    def loss(ws, k_t, v_t, ln_w, ln_b):
        norm = (ln_w, ln_b) if ln is not None else None
        out = _memory(ws, k_t, activation=activation, residual=residual, bias=bias, ln=norm, ln_eps=ln_eps)
        return (out - v_t).pow(2).sum()

    def read_one(ws, q_t, ln_w, ln_b):
        norm = (ln_w, ln_b) if ln is not None else None
        return _memory(ws, q_t, activation=activation, residual=residual, bias=bias, ln=norm, ln_eps=ln_eps)

    H = q.shape[2]
    ln_w, ln_b = ln if ln is not None else (q.new_zeros(H, 1), q.new_zeros(H, 1))  # placeholders
    per_head = (0, 0, 0, 0, 0)  # vmap over heads, then over batch (LN params are per head only)
    grad_fn = vmap(vmap(grad(loss), in_dims=per_head), in_dims=(0, 0, 0, None, None))
    read_fn = vmap(vmap(read_one, in_dims=(0, 0, 0, 0)), in_dims=(0, 0, None, None))

    ys = []
    for t in range(q.shape[1]):
        u = grad_fn(tuple(start), k[:, t], v[:, t], ln_w, ln_b)  # per layer (B, H, d_in, d_out)
        if max_grad_norm is not None:  # soft clip of the whole gradient: ||s u|| < G
            norm_sq = sum(du.pow(2).sum((-2, -1)) for du in u)  # (B, H)
            scale = torch.rsqrt(1 + norm_sq / max_grad_norm ** 2)[..., None, None]
            u = [du * scale for du in u]
        th, et, al = (g[:, t, :, None, None] for g in (theta, eta, alpha))  # (B, H, 1, 1)
        mom = [et * s - th * du for s, du in zip(mom, u)]
        cur = [(1 - al) * w + s for w, s in zip(cur, mom)]
        ys.append(read_fn(tuple(cur if read == "token" else start), q[:, t], ln_w, ln_b))
        pos += 1
        if pos == chunk_size:
            start, pos = list(cur), 0
    o = torch.stack(ys, dim=1) if ys else v.new_zeros(v.shape)  # (B, T, H, V)
    final = TitansState(tuple(start), tuple(cur), tuple(mom), pos)
    return o, (final if output_final_state else None)
