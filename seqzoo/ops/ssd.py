"""State space duality (SSD), the core of Mamba2 (Dao & Gu 2024, "Transformers are SSMs").

Per head h (scalar decay A_h < 0, head dim P, state dim N) and token t:

    h_t = exp(dt_t A_h) h_{t-1} + dt_t x_t B_tᵀ        h_t: (P, N)
    y_t = h_t C_t + D_h x_t

B_t, C_t come in G groups shared by H/G consecutive heads (head h reads group h // (H/G),
as mamba-ssm's kernels do). SSD is scalar-gated linear attention with q = C, k = B,
v = dt·x and log-gate dt·A (paper sections 4-5, "state space duality"), so it has two exact forms:

* ``ssd_sequential``: the recurrence above, one token at a time (``ssd_step``).
* ``ssd`` (chunked, paper section 6 / "SSD minimal"): within a chunk of C tokens the
  quadratic "attention" form (C Bᵀ ⊙ L) (dt·x) with the 1-semiseparable mask
  L[t, s] = exp(Σ_{s<r≤t} dt_r A); across chunks the (P, N) states are passed by the
  recurrence, so the cost is linear in T.

Negative eigenvalues (``allow_neg_eigval``, Grazzi et al. 2024, "Unlocking State-Tracking
in Linear RNNs Through Negative Eigenvalues"): the transition exp(dt_t A_h) becomes
a_t = 2·exp(dt_t A_h) − 1 ∈ (−1, 1] (``seqzoo.ops.transition``), the input term dt·x·Bᵀ
stays. Log space cannot hold such a transition (a_t < 0, and a_t = 0 exactly where
exp(dt A) = 1/2), so with the option the chunked form multiplies instead of summing logs:
L[t, s] = Π_{s<r≤t} a_r is a cumulative product down the masked (C, C) matrix of the a_r
(1 where r ≤ s), and the decay from the chunk start Π_{r≤t} a_r a cumulative product
along the chunk. That is exact for negative and zero factors alike (no sign track, no
log 0 = −inf), never overflows since |a_r| ≤ 1 (small products underflow to 0, as the
exp of a very negative log-sum does), and is differentiated by autograd (torch's cumprod
backward is exact with zero factors). The recurrent forms use the same a_t.

Conventions: ``dt`` is the *discretisation step already made positive* — the caller applies
``softplus(dt_raw + dt_bias)`` (and any clamp) first; A is the negative decay rate
(``-exp(A_log)``). Inputs in half precision are computed in fp32 and returned in their dtype.
Both functions return ``(y, final_state)`` with ``final_state`` None unless
``output_final_state``; states are (B, H, P, N).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from seqzoo.ops.transition import transition


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _check_shapes(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                  initial_state: Tensor | None) -> tuple[int, int]:
    """Validate the layouts; returns (G, H // G)."""
    if x.dim() != 4:
        raise ValueError(f"x: expected (B, T, H, P), got shape {tuple(x.shape)}")
    b, t, h, p = x.shape
    if dt.shape != (b, t, h):
        raise ValueError(f"dt: expected {(b, t, h)}, got {tuple(dt.shape)}")
    if A.shape != (h,):
        raise ValueError(f"A: expected ({h},), got {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (b, t) or B.shape != C.shape:
        raise ValueError(f"B, C: expected (B={b}, T={t}, G, N) each, got {tuple(B.shape)} and {tuple(C.shape)}")
    g, n = B.shape[2], B.shape[3]
    if h % g:
        raise ValueError(f"heads H={h} must be a multiple of the groups G={g}")
    if D is not None and D.shape not in ((h,), (h, p)):
        raise ValueError(f"D: expected ({h},) or ({h}, {p}), got {tuple(D.shape)}")
    if initial_state is not None and initial_state.shape != (b, h, p, n):
        raise ValueError(f"initial_state: expected {(b, h, p, n)}, got {tuple(initial_state.shape)}")
    return g, h // g


def _skip(x: Tensor, D: Tensor | None) -> Tensor:
    """D x with D per head (H,) or per channel (H, P); x: (..., H, P)."""
    if D is None:
        return torch.zeros_like(x)
    return x * (D[:, None] if D.dim() == 1 else D)


# -- recurrent form ---------------------------------------------------------------------
def ssd_step(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, state: Tensor, *,
             D: Tensor | None = None, allow_neg_eigval: bool = False) -> tuple[Tensor, Tensor]:
    """One token: x (B, H, P), dt (B, H), A (H,), B, C (B, G, N), state (B, H, P, N);
    transition 2·exp(dt A) − 1 instead of exp(dt A) with ``allow_neg_eigval``.

    Returns y (B, H, P) and the new state (a new tensor; ``state`` is not modified)."""
    dtype, cdt = x.dtype, _compute_dtype(x)
    x, dt, A, B, C, state = (z.to(cdt) for z in (x, dt, A, B, C, state))
    r = x.shape[1] // B.shape[1]
    xg = rearrange(x, "b (g r) p -> b g r p", r=r)  # (B, G, H/G, P)
    decay = rearrange(transition(dt * A, allow_neg_eigval), "b (g r) -> b g r 1 1", r=r)  # (B, G, H/G, 1, 1)
    dtg = rearrange(dt, "b (g r) -> b g r", r=r)  # (B, G, H/G)
    state = rearrange(state, "b (g r) p n -> b g r p n", r=r)  # (B, G, H/G, P, N)
    state = decay * state + torch.einsum("bgr,bgrp,bgn->bgrpn", dtg, xg, B)
    y = torch.einsum("bgrpn,bgn->bgrp", state, C)
    y = rearrange(y, "b g r p -> b (g r) p") + _skip(x, D)  # (B, H, P)
    return y.to(dtype), rearrange(state, "b g r p n -> b (g r) p n").to(dtype)  # (B, H, P, N)


def ssd_sequential(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *,
                   D: Tensor | None = None, initial_state: Tensor | None = None,
                   output_final_state: bool = False,
                   allow_neg_eigval: bool = False) -> tuple[Tensor, Tensor | None]:
    """The SSD recurrence token by token (the readable reference).

    x: (B, T, H, P), dt: (B, T, H) positive, A: (H,), B, C: (B, T, G, N), D: (H,) or (H, P),
    initial_state: (B, H, P, N). Returns y: (B, T, H, P) and the final state or None.
    ``allow_neg_eigval``: transition 2·exp(dt A) − 1 (module doc)."""
    _check_shapes(x, dt, A, B, C, D, initial_state)
    b, t, h, p = x.shape
    n = B.shape[-1]
    state = (initial_state if initial_state is not None
             else x.new_zeros(b, h, p, n))
    ys = []
    for i in range(t):
        y, state = ssd_step(x[:, i], dt[:, i], A, B[:, i], C[:, i], state, D=D,
                            allow_neg_eigval=allow_neg_eigval)
        ys.append(y)
    y = torch.stack(ys, 1) if ys else torch.zeros_like(x)  # (B, T, H, P)
    return y, (state if output_final_state else None)


# -- chunked form -----------------------------------------------------------------------
def segsum(a: Tensor) -> Tensor:
    """Stable segment sums: out[..., t, s] = Σ_{s<r≤t} a[..., r] for s ≤ t, -inf above.

    Each entry is summed directly from the a_r it spans (a masked cumsum) rather than as a
    difference of two prefix sums, which would cancel catastrophically once the prefix
    sums grow large (the concern raised in the paper's minimal SSD listing)."""
    c = a.shape[-1]
    a = a[..., None].expand(*a.shape, c)  # (..., C, C): a[..., r, s] = a_r
    # Masks from index comparisons (torch.tril is needlessly slow on small CPU tensors).
    idx = torch.arange(c, device=a.device)
    out = torch.cumsum(a.masked_fill(idx[:, None] <= idx[None, :], 0.0), dim=-2)  # Σ_{s<r≤t} a_r
    return out.masked_fill(idx[:, None] < idx[None, :], float("-inf"))


def segprod(a: Tensor) -> Tensor:
    """Segment products: out[..., t, s] = Π_{s<r≤t} a[..., r] for s ≤ t (1 on the diagonal),
    0 above. The multiplicative twin of ``exp(segsum(log a))`` for factors of any sign,
    zero included (module doc): a cumulative product down the (C, C) matrix of the a_r
    with the factors r ≤ s replaced by 1, then the upper triangle zeroed."""
    c = a.shape[-1]
    a = a[..., None].expand(*a.shape, c)  # (..., C, C): a[..., r, s] = a_r
    idx = torch.arange(c, device=a.device)
    out = torch.cumprod(a.masked_fill(idx[:, None] <= idx[None, :], 1.0), dim=-2)  # Π_{s<r≤t} a_r
    return out.masked_fill(idx[:, None] < idx[None, :], 0.0)


def ssd(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *, chunk_size: int,
        D: Tensor | None = None, initial_state: Tensor | None = None,
        output_final_state: bool = False, allow_neg_eigval: bool = False) -> tuple[Tensor, Tensor | None]:
    """Chunked SSD (Dao & Gu 2024, section 6): same arguments and result as ``ssd_sequential``.

    Any T: the last chunk is padded with dt = 0, which neither decays the state nor writes
    to it (its transition is 1 with or without ``allow_neg_eigval``), so the final state is
    exact. Cost O(T·C) for the intra-chunk part. With ``allow_neg_eigval`` the decays are
    products of the transitions 2·exp(dt A) − 1 instead of exps of log-sums (module doc)."""
    g, r = _check_shapes(x, dt, A, B, C, D, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dtype, cdt = x.dtype, _compute_dtype(x)
    b, t, h, p = x.shape
    n = B.shape[-1]
    x, dt, A, B, C = (z.to(cdt) for z in (x, dt, A, B, C))
    if t == 0:  # nothing to mix: the state passes through unchanged
        return ssd_sequential(x, dt, A, B, C, D=D, initial_state=initial_state,
                              output_final_state=output_final_state, allow_neg_eigval=allow_neg_eigval)
    pad = (-t) % chunk_size
    if pad:
        x, B, C = (F.pad(z, (0, 0, 0, 0, 0, pad)) for z in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    c = chunk_size
    xdt = rearrange(x * dt[..., None], "b (k c) (g r) p -> b k c g r p", c=c, g=g)  # (B, K, C, G, R, P)
    Bc = rearrange(B, "b (k c) g n -> b k c g n", c=c)  # (B, K, C, G, N)
    Cc = rearrange(C, "b (k c) g n -> b k c g n", c=c)  # (B, K, C, G, N)
    a = rearrange(dt * A, "b (k c) (g r) -> b k g r c", c=c, g=g)  # (B, K, G, R, C) log-decays
    if allow_neg_eigval:  # transitions of any sign: products, not log-sums (module doc)
        a = transition(a, True)  # (B, K, G, R, C)
        L = segprod(a)  # (B, K, G, R, C, C)
        from_start = torch.cumprod(a, dim=-1)  # Π_{r≤t} a_r   (B, K, G, R, C)
    else:
        L = torch.exp(segsum(a))  # (B, K, G, R, C, C)
        from_start = torch.exp(torch.cumsum(a, dim=-1))  # (B, K, G, R, C)

    # 1. Intra-chunk (the "diagonal blocks"): quadratic attention-like form with mask L.
    scores = torch.einsum("bktgn,bksgn->bkgts", Cc, Bc)  # (B, K, G, C, C)
    y = torch.einsum("bkgts,bkgrts,bksgrp->bktgrp", scores, L, xdt)  # (B, K, C, G, R, P)

    # 2. State each chunk adds by its end, from its own tokens only.
    decay_to_end = L[..., -1, :]  # (B, K, G, R, C): the stable segsum's last row, not a_end - a_s
    chunk_states = torch.einsum("bkcgn,bkgrc,bkcgrp->bkgrpn", Bc, decay_to_end, xdt)  # (B, K, G, R, P, N)

    # 3. Inter-chunk recurrence over the K chunk boundaries (linear in T).
    state = (initial_state.to(cdt) if initial_state is not None else x.new_zeros(b, h, p, n))
    state = rearrange(state, "b (g r) p n -> b g r p n", g=g)  # (B, G, R, P, N)
    chunk_decay = from_start[..., -1, None, None]  # (B, K, G, R, 1, 1)
    starts = []
    # unbind, not [:, k]: indexing in a loop makes autograd allocate a full-size zero
    # gradient per chunk (quadratic in T); unbind's backward is a single stack.
    for decay_k, states_k in zip(chunk_decay.unbind(1), chunk_states.unbind(1)):
        starts.append(state)
        state = decay_k * state + states_k
    start_states = torch.stack(starts, 1)  # (B, K, G, R, P, N)

    # 4. Contribution of the state entering each chunk, decayed to every position.
    y = y + torch.einsum("bktgn,bkgrpn,bkgrt->bktgrp", Cc, start_states, from_start)
    y = rearrange(y, "b k c g r p -> b (k c) (g r) p")[:, :t]  # (B, T, H, P)
    y = y + _skip(x[:, :t], D.to(cdt) if D is not None else None)
    final = rearrange(state, "b g r p n -> b (g r) p n").to(dtype) if output_final_state else None
    return y.to(dtype), final
