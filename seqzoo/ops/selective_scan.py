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
* ``selective_scan_chunked`` (``seqzoo.ops.selective_scan_chunked``): a closed form per
  chunk in log space, chunk after chunk, with a hand-written backward; many times faster on
  CPU, exact up to rounding for any decay (chunks are cut to a decay budget).

Negative eigenvalues (``allow_neg_eigval``, Grazzi et al. 2024, "Unlocking State-Tracking
in Linear RNNs Through Negative Eigenvalues"): the transition exp(Δ_t[d] A[d, n]) becomes
2·exp(Δ_t[d] A[d, n]) − 1 ∈ (−1, 1] (``seqzoo.ops.transition``), the input term Δ B u
stays. The sequential form computes it as written. The chunked closed form cannot: it
needs the cumulative log-decay A[d, n] Γ_t[d] (an outer product) and divides by
cumulative decays, while log|2·exp(ΔA) − 1| is no outer product, changes sign, and is
−inf where exp(ΔA) = 1/2. So with the option every reference method ("auto", "chunked",
"sequential") runs the sequential form, exact for negative and zero transitions, and its
gradients come from autograd through it; mamba-ssm's kernel (no such option) is refused.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from seqzoo.ops.selective_scan_chunked import MIN_AUTO_LENGTH, default_chunk_size, selective_scan_chunked
from seqzoo.ops.selective_scan_layout import as_groups, check_shapes, compute_dtype, finish
from seqzoo.ops.transition import transition

__all__ = ["default_chunk_size", "selective_scan", "selective_scan_chunked", "selective_scan_mamba_ssm",
           "selective_scan_sequential"]


class _Prepared:
    """The sequential form's inputs, time-major in a (B, T, G, D/G, ...) layout, so that one
    time step is one contiguous slice and grouped B, C broadcast over the channels of their
    group without being repeated. Δ A and Δ u B, (B, T, D, N) each, are never formed for
    the whole sequence: the loop forms them one slice at a time."""

    def __init__(self, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                 delta_bias: Tensor | None, delta_softplus: bool,
                 initial_state: Tensor | None) -> None:
        batch, dim, length, n_state, gb, gc = check_shapes(u, delta, A, B, C, initial_state)
        groups = gb * gc // math.gcd(gb, gc)
        self.dtype = dt = compute_dtype(u.dtype)
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
        self.B = as_groups(B, groups, dt)  # broadcastable to (B, T, G, D/G, N)
        self.C = as_groups(C, groups, dt)
        self.static_B, self.static_C = B.dim() == 2, C.dim() == 2
        if initial_state is None:
            self.h0 = u.new_zeros(batch, groups, dim // groups, n_state, dtype=dt)
        else:
            self.h0 = rearrange(initial_state.to(dt), "b (g h) n -> b g h n", g=groups)  # (B, G, D/G, N)

    def finish(self, y: Tensor, h_last: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None,
               return_final_state: bool) -> Tensor | tuple[Tensor, Tensor]:
        """y: (B, D, T), h_last: (B, G, D/G, N) -> mamba-ssm's outputs."""
        return finish(y, rearrange(h_last, "b g h n -> b (g h) n"), u, D, z, return_final_state)  # (B, D, N)


def _slices(x: Tensor, static: bool, n: int) -> list[Tensor]:
    """The n time slices of x along dim 1 (a time-invariant x repeats its one slice).
    unbind, not indexing: its backward is one stack instead of n full-size scatters."""
    return [x[:, 0]] * n if static else list(x.unbind(1))


def selective_scan_sequential(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                              D: Tensor | None = None, z: Tensor | None = None,
                              delta_bias: Tensor | None = None, delta_softplus: bool = False,
                              initial_state: Tensor | None = None,
                              return_final_state: bool = False,
                              allow_neg_eigval: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """The per-token recurrence of Mamba's Algorithm 2 (readable reference); with
    ``allow_neg_eigval`` the transition is 2·exp(ΔA) − 1 (module doc).

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
        h = torch.addcmul(delta_us[t] * Bs[t], transition(deltas[t] * p.A, allow_neg_eigval), h)
        ys.append((h * Cs[t]).sum(-1, keepdim=True))  # (B, G, D/G, 1)
    y = torch.stack(ys, 1) if ys else p.h0.new_zeros(p.batch, 0, *p.h0.shape[1:3], 1)  # (B, T, G, D/G, 1)
    return p.finish(rearrange(y, "b t g h 1 -> b (g h) t"), h, u, D, z, return_final_state)


def selective_scan_mamba_ssm(*args, **kwargs) -> Tensor | tuple[Tensor, Tensor]:
    """mamba-ssm's fused CUDA kernel (``seqzoo.kernels.mamba_ssm``, imported lazily; CUDA
    only), initial state included."""
    from seqzoo.kernels.mamba_ssm import selective_scan_mamba_ssm as kernel

    return kernel(*args, **kwargs)


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                   D: Tensor | None = None, z: Tensor | None = None,
                   delta_bias: Tensor | None = None, delta_softplus: bool = False,
                   initial_state: Tensor | None = None, return_final_state: bool = False,
                   *, method: Literal["auto", "chunked", "sequential", "mamba_ssm"] = "auto",
                   chunk_size: int | None = None, allow_neg_eigval: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Mamba's selective scan with mamba-ssm's signature (plus ``initial_state`` and
    ``method``); see the module docstring for the maths and layouts. ``method="auto"``
    scans in chunks, except sequences shorter than 24 tokens, which the sequential loop
    scans faster than the chunked form sets itself up. With ``allow_neg_eigval``
    (transition 2·exp(ΔA) − 1) every reference method runs the sequential form and
    ``"mamba_ssm"`` is an error (module doc)."""
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_final_state)
    if allow_neg_eigval and method in ("auto", "chunked", "sequential"):
        return selective_scan_sequential(*args, allow_neg_eigval=True)
    if allow_neg_eigval and method == "mamba_ssm":
        raise ValueError("allow_neg_eigval: mamba_ssm's scan computes the transition exp(ΔA) only "
                         "(no negative eigenvalues); use a reference method")
    if method == "mamba_ssm":
        return selective_scan_mamba_ssm(*args)
    if method == "auto":
        method = "sequential" if u.shape[-1] < MIN_AUTO_LENGTH else "chunked"
    if method == "chunked":
        return selective_scan_chunked(*args, chunk_size=chunk_size)
    if method == "sequential":
        return selective_scan_sequential(*args)
    raise ValueError(f"method: expected 'auto', 'chunked', 'sequential' or 'mamba_ssm', got {method!r}")
