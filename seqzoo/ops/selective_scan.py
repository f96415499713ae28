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
* ``selective_scan_chunked``: the time axis is cut into T/C chunks of C tokens, and every
  loop runs over all chunks at once: (1) the recurrence runs inside every chunk from a zero
  state (C steps) to get each chunk's end state; (2) the true chunk-start states are passed
  from chunk to chunk with the whole-chunk decay exp(A Σ_chunk Δ) (T/C steps); (3) every
  chunk is rerun from its true start state, reading y out (C steps). Every exponent is
  Δ·A <= 0, so nothing overflows however strong the decay. That is 2C + T/C Python steps
  instead of T, on slices T/C times larger, with about the same O(T·D·N) arithmetic: it
  pays off when one token's B·D·N state is small enough for the sequential loop to be
  bound by per-operation overhead (see ``default_chunk_size``). An SSD-style masked (C×C)
  decay matmul does not pay off here: S6's decay depends on (d, n), so the decay matrix
  would be (B, D, T/C, C, C, N), C times the size of the states themselves.

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
    """B or C time-major, broadcastable to (B, T, G, D/G, N) for ``groups`` = G."""
    M = M.to(dtype)
    if M.dim() == 2:
        return rearrange(M, "(g h) n -> 1 1 g h n", g=groups)  # (1, 1, G, D/G, N)
    if M.dim() == 3:
        return rearrange(M, "b n t -> b t 1 1 n")  # (B, T, 1, 1, N)
    # G divides ``groups`` (both divide D): sub-group g*r + i lies inside group g.
    return repeat(M, "b g n t -> b t (g r) 1 n", r=groups // M.shape[1])  # (B, T, G, 1, N)


class _Prepared:
    """The inputs of both forms, time-major in a (B, T, G, D/G, ...) layout, so that one
    time step is one contiguous slice and grouped B, C broadcast over the channels of their
    group without being repeated. Δ A and Δ u B, (B, T, D, N) each, are never formed for
    the whole sequence: the loops form them one slice at a time."""

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
            ok = (M.shape == (dim, n_state) if M.dim() == 2 else
                  M.shape[0] == batch and M.shape[-2] == n_state and M.shape[-1] == length)
            if not ok:
                raise ValueError(f"{name}: shape {tuple(M.shape)} does not match B={batch}, D={dim}, "
                                 f"N={n_state}, T={length}")
        groups = gb * gc // math.gcd(gb, gc)
        self.dtype = dt = _compute_dtype(u.dtype)
        self.batch, self.dim, self.length, self.n_state, self.groups = batch, dim, length, n_state, groups

        delta = delta.to(dt)
        if delta_bias is not None:
            delta = delta + rearrange(delta_bias.to(dt), "d -> d 1")
        if delta_softplus:
            delta = F.softplus(delta)
        to_g = "b (g h) t -> b t g h 1"
        self.delta = rearrange(delta, to_g, g=groups)  # (B, T, G, D/G, 1)
        self.delta_u = rearrange(delta * u.to(dt), to_g, g=groups)  # (B, T, G, D/G, 1)
        self.A = rearrange(A.to(dt), "(g h) n -> g h n", g=groups)  # (G, D/G, N)
        self.B = _as_groups(B, groups, dt)  # broadcastable to (B, T, G, D/G, N)
        self.C = _as_groups(C, groups, dt)
        self.static_B, self.static_C = B.dim() == 2, C.dim() == 2
        if initial_state is None:
            self.h0 = u.new_zeros(batch, groups, dim // groups, n_state, dtype=dt)
        else:
            if initial_state.shape != (batch, dim, n_state):
                raise ValueError(f"initial_state: expected shape {(batch, dim, n_state)}, "
                                 f"got {tuple(initial_state.shape)}")
            self.h0 = rearrange(initial_state.to(dt), "b (g h) n -> b g h n", g=groups)  # (B, G, D/G, N)

    def finish(self, y: Tensor, h_last: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None,
               return_final_state: bool) -> Tensor | tuple[Tensor, Tensor]:
        """y: (B, D, T), h_last: (B, G, D/G, N) -> mamba-ssm's outputs."""
        if D is not None:
            y = y + u.to(self.dtype) * rearrange(D.to(self.dtype), "d -> d 1")
        if z is not None:
            y = y * F.silu(z.to(self.dtype))
        y = y.to(u.dtype)
        if not return_final_state:
            return y
        return y, rearrange(h_last, "b g h n -> b (g h) n")  # (B, D, N)


def _slices(x: Tensor, static: bool, n: int) -> list[Tensor]:
    """The n time slices of x along dim 1 (a time-invariant x repeats its one slice).
    unbind, not indexing: its backward is one stack instead of n full-size scatters."""
    return [x[:, 0]] * n if static else list(x.unbind(1))


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
    T = p.length
    deltas, delta_us = p.delta.unbind(1), p.delta_u.unbind(1)  # T x (B, G, D/G, 1)
    Bs, Cs = _slices(p.B, p.static_B, T), _slices(p.C, p.static_C, T)  # T x (B, G, 1|D/G, N)
    h, ys = p.h0, []
    for t in range(T):
        # h_t = exp(Δ_t A) h_{t-1} + Δ_t u_t B_t ;  y_t = C_t · h_t      (B, G, D/G, N)
        h = torch.addcmul(delta_us[t] * Bs[t], (deltas[t] * p.A).exp(), h)
        ys.append((h * Cs[t]).sum(-1, keepdim=True))  # (B, G, D/G, 1)
    y = torch.stack(ys, 1) if ys else p.h0.new_zeros(p.batch, 0, *p.h0.shape[1:3], 1)  # (B, T, G, D/G, 1)
    return p.finish(rearrange(y, "b t g h 1 -> b (g h) t"), h, u, D, z, return_final_state)


# Elements of one (B, Nc, D, N) slice that keep the loops' operands in a core's L2 cache.
_SLICE_ELEMENTS = 2 ** 16


def default_chunk_size(length: int, step_elements: int = 1) -> int:
    """Chunk length C for T = ``length`` tokens whose state has ``step_elements`` = B·D·N
    numbers. The Python steps, 2C + T/C, are fewest at T/C = √(2T) chunks; but a slice of
    T/C chunks must also stay in cache, so T/C <= 2^16 / (B·D·N). When that allows only one
    chunk, chunking buys nothing (``selective_scan(method="auto")`` then runs sequentially)."""
    n_chunks = max(1, min(math.isqrt(2 * max(length, 1)), _SLICE_ELEMENTS // max(step_elements, 1)))
    return max(1, -(-length // n_chunks))


def selective_scan_chunked(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                           D: Tensor | None = None, z: Tensor | None = None,
                           delta_bias: Tensor | None = None, delta_softplus: bool = False,
                           initial_state: Tensor | None = None, return_final_state: bool = False,
                           *, chunk_size: int | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """The same scan in chunks of ``chunk_size`` tokens (default: ``default_chunk_size``);
    see the module doc."""
    p = _Prepared(u, delta, A, B, C, delta_bias, delta_softplus, initial_state)
    if p.length == 0:
        return p.finish(u.new_zeros(p.batch, p.dim, 0, dtype=p.dtype), p.h0, u, D, z, return_final_state)
    size = chunk_size or default_chunk_size(p.length, p.batch * p.dim * p.n_state)
    if size < 1:
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size}")
    size = min(size, p.length)
    pad = -p.length % size

    def chunks(x: Tensor, static: bool = False) -> list[Tensor]:
        """C slices, slice i holding position i of every chunk: (B, Nc, G, D/G|1, ...)."""
        if static:
            return [x[:, 0]] * size
        x = F.pad(x, (0, 0, 0, 0, 0, 0, 0, pad))  # zero-pad time (dim 1)
        x = rearrange(x, "b (c l) g h n -> b l c g h n", l=size).contiguous()  # (B, C, Nc, G, H, N)
        return list(x.unbind(1))  # contiguous slices, one per in-chunk position

    # Padding: Δ = 0 means decay exp(0) = 1 and input 0, so the state passes through.
    deltas, delta_us = chunks(p.delta), chunks(p.delta_u)  # C x (B, Nc, G, D/G, 1)
    Bs, Cs = chunks(p.B, p.static_B), chunks(p.C, p.static_C)  # C x (B, Nc, G, 1|D/G, N)

    def decay_and_input(i: int) -> tuple[Tensor, Tensor]:
        """exp(Δ A) and Δ u B at in-chunk position i of every chunk: (B, Nc, G, D/G, N)."""
        return (deltas[i] * p.A).exp(), delta_us[i] * Bs[i]

    # 1) The state at the end of every chunk, started from zero, all chunks at once.
    #    Under autograd the (B, T, D, N) decays and inputs are saved anyway, so they are
    #    kept for step 3; without it they are recomputed there, keeping memory at O(B·Nc·D·N).
    keep = torch.is_grad_enabled()
    kept = []
    h = None
    for i in range(size):
        decay, x = decay_and_input(i)
        h = x if h is None else torch.addcmul(x, decay, h)
        if keep:
            kept.append((decay, x))
    chunk_decay = (sum(deltas) * p.A).exp()  # (B, Nc, G, D/G, N): exp(A Σ_chunk Δ) ≤ 1

    # 2) The true state at the start of every chunk, passed from chunk to chunk.
    state, starts = p.h0, []
    for decay_c, h_c in zip(chunk_decay.unbind(1), h.unbind(1)):
        starts.append(state)
        state = torch.addcmul(h_c, decay_c, state)
    h = torch.stack(starts, 1)  # (B, Nc, G, D/G, N)

    # 3) Rerun every chunk from its true start state, reading y out on the way.
    ys = []
    for i in range(size):
        decay, x = kept[i] if keep else decay_and_input(i)
        h = torch.addcmul(x, decay, h)
        ys.append((h * Cs[i]).sum(-1, keepdim=True))  # (B, Nc, G, D/G, 1)
    y = rearrange(torch.stack(ys, 1), "b l c g h 1 -> b (g h) (c l)")[..., :p.length]  # (B, D, T)
    return p.finish(y, state, u, D, z, return_final_state)


def selective_scan_mamba_ssm(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                             D: Tensor | None = None, z: Tensor | None = None,
                             delta_bias: Tensor | None = None, delta_softplus: bool = False,
                             return_final_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """mamba-ssm's fused CUDA kernel, imported lazily (CUDA only). It has no initial-state
    input: the scan always starts from h = 0. Not exercised by the CPU test suite."""
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    # The kernel wants A, D and the Δ bias in fp32 whatever the activations' dtype.
    D = D.float() if D is not None else None
    delta_bias = delta_bias.float() if delta_bias is not None else None
    return selective_scan_fn(u, delta, A.float(), B, C, D, z, delta_bias, delta_softplus,
                             return_last_state=return_final_state)


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                   D: Tensor | None = None, z: Tensor | None = None,
                   delta_bias: Tensor | None = None, delta_softplus: bool = False,
                   initial_state: Tensor | None = None, return_final_state: bool = False,
                   *, method: Literal["auto", "chunked", "sequential", "mamba_ssm"] = "auto",
                   chunk_size: int | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Mamba's selective scan with mamba-ssm's signature (plus ``initial_state`` and
    ``method``); see the module docstring for the maths and layouts. ``method="auto"``
    scans in chunks unless the default chunk would be the whole sequence (large B·D·N per
    step: the per-step work already amortises Python's overhead), then sequentially."""
    if method == "mamba_ssm":
        if initial_state is not None:
            raise ValueError("method='mamba_ssm': the kernel cannot start from an initial_state; "
                             "use 'chunked' to continue a scan")
        return selective_scan_mamba_ssm(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_final_state)
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_final_state)
    if method == "auto":
        length, step_elements = u.shape[-1], u.shape[0] * u.shape[1] * A.shape[-1]
        whole = (chunk_size or default_chunk_size(length, step_elements)) >= length
        method = "sequential" if whole and length > 1 else "chunked"
    if method == "chunked":
        return selective_scan_chunked(*args, chunk_size=chunk_size)
    if method == "sequential":
        return selective_scan_sequential(*args)
    raise ValueError(f"method: expected 'auto', 'chunked', 'sequential' or 'mamba_ssm', got {method!r}")
