"""The delta rule (Schlag et al. 2021; Yang et al. 2024, "Parallelizing Linear Transformers
with the Delta Rule over Sequence Length"): a readable per-token recurrence and the chunked
form through the WY/UT representation.

Per head, with the state S ∈ R^{K×V} (keys index rows):

    S_t = (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ = S_{t−1} + k_t u_tᵀ,
    u_t = β_t (v_t − S_{t−1}ᵀ k_t),          o_t = S_tᵀ (scale · q_t).

The gated variant (Gated DeltaNet, Yang, Kautz & Hatamizadeh 2024) multiplies S_{t−1} by
α_t = exp(g_t) first; ``chunk_delta_rule`` below serves both (``g=None`` is plain DeltaNet).

Layout: q, k (B, T, H, K), v (B, T, H, V), beta (B, T, H), g (B, T, H) log decay,
state (B, H, K, V). Both forms return ``(o, final_state)`` (``final_state`` is None unless
``output_final_state``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

__all__ = ["chunk_delta_rule", "delta_rule", "delta_rule_chunked", "delta_rule_recurrent", "delta_rule_step",
           "unit_lower_inverse"]


def _compute_dtype(x: Tensor) -> torch.dtype:
    """Half precision inputs are computed in fp32 (the triangular solve needs it)."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _check_shapes(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None) -> None:
    if q.ndim != 4 or q.shape != k.shape:
        raise ValueError(f"q and k must both be (B, T, H, K), got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be (B, T, H, V) matching q {tuple(q.shape)}, got {tuple(v.shape)}")
    if beta.shape != q.shape[:3]:
        raise ValueError(f"beta must be (B, T, H) = {tuple(q.shape[:3])}, got {tuple(beta.shape)}")
    if g is not None and g.shape != q.shape[:3]:
        raise ValueError(f"g must be (B, T, H) = {tuple(q.shape[:3])}, got {tuple(g.shape)}")


def delta_rule_step(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, state: Tensor, *,
                    g: Tensor | None = None, scale: float | None = None) -> tuple[Tensor, Tensor]:
    """One token of the (gated) delta rule; the readable recurrence the chunked form must match.

    q, k: (B, H, K), v: (B, H, V), beta, g: (B, H), state: (B, H, K, V) -> o (B, H, V), new state.
    Computed in the state's dtype (fp32 for a half-precision model); o comes back in v's dtype.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out_dtype = v.dtype
    q, k, v, beta = (z.to(state.dtype) for z in (q, k, v, beta))
    if g is not None:
        state = state * g.to(state.dtype).exp()[..., None, None]
    # u_t = β_t (v_t − Sᵀ k_t): the correction that makes S map k_t (closer) to v_t.
    u = beta[..., None] * (v - torch.einsum("bhk,bhkv->bhv", k, state))  # (B, H, V)
    state = state + torch.einsum("bhk,bhv->bhkv", k, u)  # (B, H, K, V)
    o = torch.einsum("bhk,bhkv->bhv", q * scale, state)  # (B, H, V)
    return o.to(out_dtype), state


def _recurrent(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, *,
               initial_state: Tensor | None, output_final_state: bool,
               scale: float | None) -> tuple[Tensor, Tensor | None]:
    _check_shapes(q, k, v, beta, g)
    b, t, h, dk = q.shape
    dtype, out_dtype = _compute_dtype(q), v.dtype
    q, k, v, beta = (z.to(dtype) for z in (q, k, v, beta))
    g = g.to(dtype) if g is not None else None
    state = (initial_state.to(dtype) if initial_state is not None
             else q.new_zeros(b, h, dk, v.shape[-1]))  # (B, H, K, V)
    outputs = []
    for i in range(t):
        o, state = delta_rule_step(q[:, i], k[:, i], v[:, i], beta[:, i], state,
                                   g=None if g is None else g[:, i], scale=scale)
        outputs.append(o)
    o = torch.stack(outputs, 1) if outputs else v.new_zeros(b, 0, h, v.shape[-1])  # (B, T, H, V)
    return o.to(out_dtype), (state if output_final_state else None)


def delta_rule_recurrent(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, *,
                         initial_state: Tensor | None = None, output_final_state: bool = False,
                         scale: float | None = None) -> tuple[Tensor, Tensor | None]:
    """Token-by-token delta rule (Yang et al. 2024, eq. 2): O(T) sequential steps."""
    return _recurrent(q, k, v, beta, None, initial_state=initial_state,
                      output_final_state=output_final_state, scale=scale)


def unit_lower_inverse(m: Tensor, *, leaf: int = 16) -> Tensor:
    """Inverse of a batch of unit lower-triangular matrices m: (..., C, C).

    Recursive 2×2 block inversion, [[L11, 0], [L21, L22]]⁻¹ = [[L11⁻¹, 0], [−L22⁻¹ L21 L11⁻¹, L22⁻¹]],
    with ``torch.linalg.solve_triangular`` on the diagonal blocks of at most ``leaf`` rows:
    on CPU batched matmuls are several times faster per flop than batched small triangular
    solves, and the inverse (C×C) is cheaper to apply to both right-hand sides than solving
    for their K + V columns.
    """
    c = m.shape[-1]
    if c <= leaf:
        eye = torch.eye(c, dtype=m.dtype, device=m.device).expand_as(m)
        return torch.linalg.solve_triangular(m, eye, upper=False, unitriangular=True)
    h = c // 2
    inv11 = unit_lower_inverse(m[..., :h, :h], leaf=leaf)
    inv22 = unit_lower_inverse(m[..., h:, h:], leaf=leaf)
    inv21 = -(inv22 @ m[..., h:, :h]) @ inv11
    return torch.cat([F.pad(inv11, (0, c - h)), torch.cat([inv21, inv22], -1)], -2)


def chunk_delta_rule(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None = None, *,
                     chunk_size: int = 64, initial_state: Tensor | None = None,
                     output_final_state: bool = False,
                     scale: float | None = None) -> tuple[Tensor, Tensor | None]:
    """Chunked (gated) delta rule through the UT transform (Yang et al. 2024, section 3;
    with decay as in Gated DeltaNet, Yang, Kautz & Hatamizadeh 2024, section 3.3).

    Inside a chunk of C tokens starting from state S_0, with γ_t = Σ_{s≤t} g_s (0 without
    gates), the pseudo-values u_t of the recurrence satisfy the unit lower-triangular system

        u_t + β_t Σ_{s<t} e^{γ_t−γ_s} (k_tᵀk_s) u_s = β_t v_t − β_t e^{γ_t} S_0ᵀ k_t,

    i.e. (I + A) U = diag(β) V − diag(β e^γ) K S_0, so U = U⁰ − W S_0 with
    U⁰ = (I + A)⁻¹ diag(β) V and W = (I + A)⁻¹ diag(β e^γ) K (the UT / WY representation).
    A, U⁰ and W of every chunk come from batched matmuls; only the K×V state is carried
    from chunk to chunk:

        U  = U⁰ − W S_0,
        O  = diag(e^γ) Q S_0 + (Q Kᵀ ⊙ M) U,       M_{ts} = e^{γ_t−γ_s} [s ≤ t],
        S_C = e^{γ_C} S_0 + (diag(e^{γ_C−γ}) K)ᵀ U.

    All decay factors are exponents of non-positive numbers, so nothing overflows. T need
    not be a multiple of C: the tail is zero-padded (k = v = β = g = 0 leave S unchanged).
    """
    _check_shapes(q, k, v, beta, g)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    scale = dk ** -0.5 if scale is None else scale
    dtype, out_dtype = _compute_dtype(q), v.dtype
    q, k, v, beta = (z.to(dtype) for z in (q, k, v, beta))
    state = initial_state.to(dtype) if initial_state is not None else q.new_zeros(b, h, dk, dv)  # (B, H, K, V)
    if t == 0:
        return v.new_zeros(b, 0, h, dv).to(out_dtype), (state if output_final_state else None)
    c = min(chunk_size, t)  # a chunk longer than the sequence would only add padding
    pad = (-t) % c
    if pad:
        q, k, v = (F.pad(z, (0, 0, 0, 0, 0, pad)) for z in (q, k, v))
        beta = F.pad(beta, (0, 0, 0, pad))
    # contiguous once: every matmul below reads these chunk by chunk
    q = rearrange(q * scale, "b (n c) h d -> b h n c d", c=c).contiguous()  # (B, H, N, C, K)
    k = rearrange(k, "b (n c) h d -> b h n c d", c=c).contiguous()  # (B, H, N, C, K)
    v = rearrange(v, "b (n c) h d -> b h n c d", c=c)  # (B, H, N, C, V)
    beta = rearrange(beta, "b (n c) h -> b h n c 1", c=c)  # (B, H, N, C, 1)
    k_t = k.transpose(-1, -2)  # (B, H, N, K, C)
    k_beta = k * beta  # (B, H, N, C, K)
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()  # s ≤ t
    if g is not None:
        g = F.pad(g.to(dtype), (0, 0, 0, pad)) if pad else g.to(dtype)
        gamma = rearrange(g, "b (n c) h -> b h n c", c=c).cumsum(-1)  # (B, H, N, C)
        decay = (gamma[..., :, None] - gamma[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # (B, H, N, C, C)
        gamma_exp = gamma.exp()[..., None]  # (B, H, N, C, 1): e^{γ_t}
        a = (k_beta @ k_t) * decay
        scores = (q @ k_t) * decay  # upper triangle already 0
        w_rhs = k_beta * gamma_exp
        q_inter = q * gamma_exp
        k_inter = k * (gamma[..., -1:] - gamma).exp()[..., None]  # e^{γ_C−γ_t} k_t
        chunk_decay = gamma[..., -1].exp()[..., None, None]  # (B, H, N, 1, 1): e^{γ_C}
    else:
        a = k_beta @ k_t
        scores = (q @ k_t).masked_fill(~causal, 0)
        w_rhs, q_inter, k_inter, chunk_decay = k_beta, q, k, None
    eye = torch.eye(c, dtype=dtype, device=q.device)
    t_inv = unit_lower_inverse(a.tril(-1) + eye)  # (B, H, N, C, C) = (I + A)⁻¹
    u0 = t_inv @ (v * beta)  # (B, H, N, C, V)
    w = t_inv @ w_rhs  # (B, H, N, C, K)

    k_inter_t = k_inter.transpose(-1, -2)  # (B, H, N, K, C)
    starts, pseudo = [], []
    for i in range(q.shape[2]):  # only the K×V state crosses chunk boundaries
        starts.append(state)
        u = u0[:, :, i] - w[:, :, i] @ state  # (B, H, C, V)
        pseudo.append(u)
        carried = state if chunk_decay is None else state * chunk_decay[:, :, i]
        state = carried + k_inter_t[:, :, i] @ u
    s0 = torch.stack(starts, 2)  # (B, H, N, K, V)
    u = torch.stack(pseudo, 2)  # (B, H, N, C, V)
    o = q_inter @ s0 + scores @ u  # (B, H, N, C, V)
    o = rearrange(o, "b h n c v -> b (n c) h v")[:, :t]  # (B, T, H, V)
    return o.to(out_dtype), (state if output_final_state else None)


def delta_rule_chunked(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, *, chunk_size: int = 64,
                       initial_state: Tensor | None = None, output_final_state: bool = False,
                       scale: float | None = None) -> tuple[Tensor, Tensor | None]:
    """Chunked delta rule via the WY/UT representation (see ``chunk_delta_rule``)."""
    return chunk_delta_rule(q, k, v, beta, None, chunk_size=chunk_size, initial_state=initial_state,
                            output_final_state=output_final_state, scale=scale)


def delta_rule(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, *, chunk_size: int = 64,
               initial_state: Tensor | None = None, output_final_state: bool = False,
               scale: float | None = None) -> tuple[Tensor, Tensor | None]:
    """The delta rule, chunked form. q, k: (B, T, H, K), v: (B, T, H, V), beta: (B, T, H);
    returns o (B, T, H, V) and the final state (B, H, K, V) if ``output_final_state``."""
    return delta_rule_chunked(q, k, v, beta, chunk_size=chunk_size, initial_state=initial_state,
                              output_final_state=output_final_state, scale=scale)
