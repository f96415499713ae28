"""The selective scan of Mamba / S6 (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling
with Selective State Spaces", sec. 3.2 and Algorithm 2), with mamba-ssm's layouts.

Per channel d and state index n, with the zero-order-hold discretisation of the paper's
eq. (4) as simplified by Mamba (Ā = exp(ΔA), B̄ ≈ ΔB):

    h_t[d, n] = exp(Δ_t[d] A[d, n]) h_{t-1}[d, n] + Δ_t[d] B_t[n] u_t[d]
    y_t[d]    = Σ_n C_t[n] h_t[d, n] + D[d] u_t[d]            (then y ⊙ SiLU(z) if z given)

Layouts (mamba-ssm's ``selective_scan_fn``): u, delta, z: (B, D, T); A: (D, N) real;
B, C: (B, N, T) shared by all channels, (B, G, N, T) for G groups of D/G consecutive
channels, or (D, N) time-invariant; D, delta_bias: (D,); state h: (B, D, N).

Two forms, equal up to rounding:

* ``selective_scan_sequential``: the per-token loop above (the readable reference).
* ``selective_scan_chunked``: the time axis is cut into chunks of C tokens. The recurrence
  is first run inside every chunk *from a zero state*, one in-chunk position at a time but
  vectorised over all chunks at once (C steps); the chunk-end states are then passed from
  chunk to chunk (T/C steps), and each position adds the incoming state times its
  in-chunk cumulative decay exp(Σ_{s≤t} Δ_s A) (exponents are ≤ 0, so nothing overflows).
  That is C + T/C Python steps instead of T (≈ 2√T with the default C ≈ √T), with the same
  O(T·D·N) arithmetic. An SSD-style masked (C×C) decay matmul does not pay off here:
  S6's decay depends on (d, n), so the decay matrix would be (B, D, T/C, C, C, N), C times
  the size of the states themselves.

Padding convention (any T): padded steps carry Δ = 0, i.e. decay exp(0) = 1 and input 0,
so they change neither the real outputs nor the final state.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half precision loses the state over long scans; mamba-ssm also scans in fp32.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _groups(M: Tensor, n_channels: int) -> int:
    """Number of channel groups a B or C tensor implies (1 = shared by all channels)."""
    if M.dim() == 2:  # (D, N) time-invariant: one "group" per channel
        return n_channels
    if M.dim() == 3:  # (B, N, T)
        return 1
    if M.dim() == 4:  # (B, G, N, T)
        return M.shape[1]
    raise ValueError(f"B/C: expected (D, N), (B, N, T) or (B, G, N, T), got shape {tuple(M.shape)}")


def _as_groups(M: Tensor, groups: int, dtype: torch.dtype) -> Tensor:
    """B or C as a tensor broadcastable to (B, G, D/G, T, N) for ``groups`` = G."""
    M = M.to(dtype)
    if M.dim() == 2:
        return rearrange(M, "(g h) n -> 1 g h 1 n", g=groups)  # (1, G, D/G, 1, N)
    if M.dim() == 3:
        return rearrange(M, "b n t -> b 1 1 t n")  # (B, 1, 1, T, N)
    # G divides ``groups`` (both divide D): sub-group g*r + i lies inside group g.
    return repeat(M, "b g n t -> b (g r) 1 t n", r=groups // M.shape[1])  # (B, G', 1, T, N)


class _Prepared:
    """The discretised inputs shared by both forms, in a (B, G, D/G, T, N) layout so that
    grouped B, C broadcast without being repeated over the channels of a group."""

    def __init__(self, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                 delta_bias: Tensor | None, delta_softplus: bool,
                 initial_state: Tensor | None) -> None:
        if A.is_complex():
            raise NotImplementedError("selective_scan: complex A (S4D-Lin) is not supported; "
                                      "Mamba uses a real A = -exp(A_log)")
        batch, dim, length = u.shape
        if delta.shape != u.shape:
            raise ValueError(f"delta: expected shape {tuple(u.shape)} like u, got {tuple(delta.shape)}")
        if A.dim() != 2 or A.shape[0] != dim:
            raise ValueError(f"A: expected shape (D={dim}, N), got {tuple(A.shape)}")
        n_state = A.shape[1]
        gb, gc = _groups(B, dim), _groups(C, dim)
        for name, M, g in (("B", B, gb), ("C", C, gc)):
            if dim % g != 0:
                raise ValueError(f"{name}: {g} groups do not divide D={dim}")
            n_axis = 1 if M.dim() == 2 else -2
            if M.shape[n_axis] != n_state or (M.dim() > 2 and (M.shape[0] != batch or M.shape[-1] != length)):
                raise ValueError(f"{name}: shape {tuple(M.shape)} does not match B={batch}, N={n_state}, T={length}")
        groups = gb * gc // math.gcd(gb, gc)
        self.dtype = dt = _compute_dtype(u.dtype)
        self.batch, self.dim, self.length, self.n_state, self.groups = batch, dim, length, n_state, groups

        delta = delta.to(dt)
        if delta_bias is not None:
            delta = delta + rearrange(delta_bias.to(dt), "d -> d 1")
        if delta_softplus:
            delta = F.softplus(delta)
        # Kept factored: the (B, D, T, N) products Δ_t A and Δ_t B_t u_t are formed one
        # time slice at a time inside the loops, where they stay in cache.
        to_g = "b (g h) t -> b g h t 1"
        self.delta = rearrange(delta, to_g, g=groups)  # (B, G, D/G, T, 1)
        self.delta_u = rearrange(delta * u.to(dt), to_g, g=groups)  # (B, G, D/G, T, 1)
        self.A = rearrange(A.to(dt), "(g h) n -> 1 g h n", g=groups)  # (1, G, D/G, N)
        self.B = _as_groups(B, groups, dt)  # broadcastable to (B, G, D/G, T, N)
        self.C = _as_groups(C, groups, dt)  # broadcastable to (B, G, D/G, T, N)
        if initial_state is None:
            self.h0 = u.new_zeros(batch, groups, dim // groups, n_state, dtype=dt)
        else:
            if initial_state.shape != (batch, dim, n_state):
                raise ValueError(f"initial_state: expected shape {(batch, dim, n_state)}, got {tuple(initial_state.shape)}")
            self.h0 = rearrange(initial_state.to(dt), "b (g h) n -> b g h n", g=groups)  # (B, G, D/G, N)

    def finish(self, y: Tensor, h_last: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None,
               return_final_state: bool) -> Tensor | tuple[Tensor, Tensor]:
        """y: (B, G, D/G, T), h_last: (B, G, D/G, N) -> mamba-ssm's outputs."""
        out = rearrange(y, "b g h t -> b (g h) t")  # (B, D, T)
        if D is not None:
            out = out + u.to(self.dtype) * rearrange(D.to(self.dtype), "d -> d 1")
        if z is not None:
            out = out * F.silu(z.to(self.dtype))
        out = out.to(u.dtype)
        if not return_final_state:
            return out
        return out, rearrange(h_last, "b g h n -> b (g h) n")  # (B, D, N)


def selective_scan_sequential(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                              D: Tensor | None = None, z: Tensor | None = None,
                              delta_bias: Tensor | None = None, delta_softplus: bool = False,
                              initial_state: Tensor | None = None,
                              return_final_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """The per-token recurrence of Mamba's Algorithm 2 (readable reference).

    Returns y: (B, D, T) in u's dtype, and with ``return_final_state`` also h_T: (B, D, N)
    in the compute dtype (fp32 for half inputs, else u's dtype).
    """
    p = _Prepared(u, delta, A, B, C, delta_bias, delta_softplus, initial_state)
    # unbind (not indexing) per step: its backward is one stack, not T full-size scatters.
    deltas, delta_us = p.delta.unbind(3), p.delta_u.unbind(3)  # T x (B, G, D/G, 1)
    Bs, Cs = p.B.unbind(3), p.C.unbind(3)  # T (or 1 if time-invariant) x (B, G, D/G, N)
    h, ys = p.h0, []
    for t in range(p.length):
        # h_t = exp(Δ_t A) h_{t-1} + Δ_t u_t B_t ;  y_t = C_t · h_t      (B, G, D/G, N)
        h = torch.addcmul(delta_us[t] * Bs[min(t, len(Bs) - 1)], (deltas[t] * p.A).exp(), h)
        ys.append((h * Cs[min(t, len(Cs) - 1)]).sum(-1))  # (B, G, D/G)
    y = torch.stack(ys, -1) if ys else p.h0.new_zeros(p.batch, p.groups, p.dim // p.groups, 0)
    return p.finish(y, h, u, D, z, return_final_state)


def default_chunk_size(length: int) -> int:
    """≈ √T balances the C in-chunk steps against the T/C chunk-to-chunk steps."""
    return max(1, math.isqrt(max(length, 1)))


def selective_scan_chunked(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                           D: Tensor | None = None, z: Tensor | None = None,
                           delta_bias: Tensor | None = None, delta_softplus: bool = False,
                           initial_state: Tensor | None = None, return_final_state: bool = False,
                           *, chunk_size: int | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """The same scan in chunks of ``chunk_size`` tokens (default ≈ √T); see the module doc."""
    p = _Prepared(u, delta, A, B, C, delta_bias, delta_softplus, initial_state)
    if p.length == 0:
        return p.finish(p.h0.new_zeros(*p.h0.shape[:3], 0), p.h0, u, D, z, return_final_state)
    size = chunk_size or default_chunk_size(p.length)
    if size < 1:
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size}")
    size = min(size, p.length)
    pad = -p.length % size

    def chunks(x: Tensor, time_invariant: bool = False) -> Tensor:
        if time_invariant:  # B / C of shape (D, N): one slice serves every position
            return rearrange(x, "b g h t n -> b g h t 1 n")  # (B, G, D/G, 1, 1, N)
        x = F.pad(x, (0, 0, 0, pad))
        # In-chunk position first, so that one position of every chunk is one slice.
        return rearrange(x, "b g h (c l) n -> b g h l c n", l=size)  # (B, G, D/G, C, Nc, N)

    delta = chunks(p.delta)  # (B, G, D/G, C, Nc, 1); padding: Δ = 0, no decay, no input
    delta_u = chunks(p.delta_u)  # (B, G, D/G, C, Nc, 1)
    B_, C_ = chunks(p.B, B.dim() == 2), chunks(p.C, C.dim() == 2)  # broadcastable to (B, G, D/G, C, Nc, N)
    A_ = rearrange(p.A, "1 g h n -> 1 g h 1 n")  # (1, G, D/G, 1, N)

    deltas, delta_us = delta.unbind(3), delta_u.unbind(3)  # C x (B, G, D/G, Nc, 1)
    Bs, Cs = B_.unbind(3), C_.unbind(3)  # C (or 1 if time-invariant) x (B, G, D/G, Nc, N)

    def step(h: Tensor, i: int) -> Tensor:
        """Position i of every chunk: h = exp(Δ A) h + Δ u B          (B, G, D/G, Nc, N)"""
        return torch.addcmul(delta_us[i] * Bs[min(i, len(Bs) - 1)], (deltas[i] * A_).exp(), h)

    # 1) The state at the end of every chunk, started from zero, all chunks at once.
    h = delta.new_zeros(*delta.shape[:3], delta.shape[4], p.n_state)  # (B, G, D/G, Nc, N)
    for i in range(size):
        h = step(h, i)
    chunk_decay = (delta.sum(3) * A_).exp()  # (B, G, D/G, Nc, N): exp(A Σ_chunk Δ) ≤ 1

    # 2) The true state at the start of every chunk, passed from chunk to chunk.
    state, starts = p.h0, []
    for decay_c, h_c in zip(chunk_decay.unbind(3), h.unbind(3)):
        starts.append(state)
        state = torch.addcmul(h_c, decay_c, state)
    h = torch.stack(starts, 3)  # (B, G, D/G, Nc, N)

    # 3) Rerun every chunk from its true start state, reading y out on the way.
    ys = []
    for i in range(size):
        h = step(h, i)
        ys.append((h * Cs[min(i, len(Cs) - 1)]).sum(-1))  # (B, G, D/G, Nc)
    y = rearrange(torch.stack(ys, -1), "b g h c l -> b g h (c l)")[..., :p.length]  # (B, G, D/G, T)
    return p.finish(y, state, u, D, z, return_final_state)


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                   D: Tensor | None = None, z: Tensor | None = None,
                   delta_bias: Tensor | None = None, delta_softplus: bool = False,
                   initial_state: Tensor | None = None, return_final_state: bool = False,
                   *, method: Literal["chunked", "sequential"] = "chunked",
                   chunk_size: int | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Mamba's selective scan with mamba-ssm's signature (plus ``initial_state`` and
    ``method``); see the module docstring for the maths and layouts."""
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_final_state)
    if method == "chunked":
        return selective_scan_chunked(*args, chunk_size=chunk_size)
    if method == "sequential":
        return selective_scan_sequential(*args)
    raise ValueError(f"method: expected 'chunked' or 'sequential', got {method!r}")
