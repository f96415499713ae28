"""Gated linear attention (Yang, Wang, Shen, Panda, Kim 2024, "Gated Linear Attention
Transformers with Hardware-Efficient Training") and its scalar-gate special case.

Per head, with the state S in R^{K x V} and log gates g (so alpha = exp(g) in (0, 1]):

    gla:         S_t = Diag(exp(g_t)) S_{t-1} + k_t^T v_t,   g_t in R^K   (paper eq. 3)
    simple_gla:  S_t = exp(g_t) S_{t-1} + k_t^T v_t,         g_t a scalar (Mamba2 / Gated RetNet)
    o_t = (scale * q_t) S_t

Layout (B, T, H, D), gates g: (B, T, H, K) for gla and (B, T, H) for simple_gla, states
(B, H, K, V). Every op returns ``(o, final_state)``; final_state is None unless asked for.

Each op has a readable per-token recurrent form and a chunked form (paper sec. 4.2-4.3).
Inside a chunk, GLA's scores need exp(b_i - b_j) per key dim (b: cumulative log gates),
which a matmul can only form as exp(b_i - ref) * exp(ref - b_j). The chunked GLA form does
that around the chunk's mid-range when the factors cannot overflow (the usual case, one
matmul per chunk), and otherwise falls back to the paper's secondary chunking: blocks between
sub-chunks use a reference between them (every exponent <= 0), diagonal blocks whose own
range is too wide are computed elementwise in log space. No exp(-cumsum) ever overflows,
whatever the gates.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from seqzoo.ops.chunking import causal_mask, decay_matrix, from_chunks, scan_chunk_states, to_chunks

SUB_CHUNK = 16  # secondary chunk length of the chunked GLA form (paper sec. 4.3)


def _upcast(*xs: Tensor) -> tuple[Tensor, ...]:
    """Half-precision inputs are computed in fp32 (cumulative log gates need the range)."""
    return tuple(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x for x in xs)


def _scale(q: Tensor, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else scale


def _check(q: Tensor, k: Tensor, v: Tensor, g: Tensor, gate_dims: int) -> None:
    if q.ndim != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"expected q, k: (B, T, H, K), v: (B, T, H, V); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    expected = q.shape if gate_dims == 4 else q.shape[:3]
    if g.shape != expected:
        raise ValueError(f"expected g of shape {tuple(expected)}, got {tuple(g.shape)}")


# -- one token ------------------------------------------------------------------------------
def gla_step(q: Tensor, k: Tensor, v: Tensor, g: Tensor, state: Tensor, *,
             scale: float | None = None) -> tuple[Tensor, Tensor]:
    """One token of the recurrence. q, k, g: (B, H, K), v: (B, H, V), state: (B, H, K, V).
    g may also be (B, H) (a scalar gate per head). Returns o: (B, H, V) and the new state."""
    decay = g.exp()[..., None] if g.ndim == 3 else g.exp()[..., None, None]  # (B, H, K|1, 1)
    state = decay * state + k[..., :, None] * v[..., None, :]  # (B, H, K, V)
    o = torch.einsum("bhk,bhkv->bhv", q * _scale(q, scale), state)
    return o, state


def _recurrent(q: Tensor, k: Tensor, v: Tensor, g: Tensor, *, initial_state: Tensor | None,
               output_final_state: bool, scale: float | None) -> tuple[Tensor, Tensor | None]:
    dtype = v.dtype
    q, k, v, g = _upcast(q, k, v, g)
    b, t, h, dk = q.shape
    state = (initial_state.to(q.dtype) if initial_state is not None
             else q.new_zeros(b, h, dk, v.shape[-1]))
    outs = []
    for i in range(t):
        o, state = gla_step(q[:, i], k[:, i], v[:, i], g[:, i], state, scale=scale)
        outs.append(o)
    o = torch.stack(outs, 1) if outs else v.new_zeros(b, 0, h, v.shape[-1])  # (B, T, H, V)
    return o.to(dtype), (state.to(dtype) if output_final_state else None)


def gla_recurrent(q: Tensor, k: Tensor, v: Tensor, g: Tensor, *, initial_state: Tensor | None = None,
                  output_final_state: bool = False, scale: float | None = None) -> tuple[Tensor, Tensor | None]:
    """Per-token loop of GLA (paper eq. 3). g: (B, T, H, K) log gates."""
    _check(q, k, v, g, 4)
    return _recurrent(q, k, v, g, initial_state=initial_state,
                      output_final_state=output_final_state, scale=scale)


def simple_gla_recurrent(q: Tensor, k: Tensor, v: Tensor, g: Tensor, *, initial_state: Tensor | None = None,
                         output_final_state: bool = False,
                         scale: float | None = None) -> tuple[Tensor, Tensor | None]:
    """Per-token loop of scalar-gated linear attention. g: (B, T, H) log gates."""
    _check(q, k, v, g, 3)
    return _recurrent(q, k, v, g, initial_state=initial_state,
                      output_final_state=output_final_state, scale=scale)


# -- chunked forms --------------------------------------------------------------------------
def simple_gla_chunked(q: Tensor, k: Tensor, v: Tensor, g: Tensor, *, chunk_size: int = 64,
                       initial_state: Tensor | None = None, output_final_state: bool = False,
                       scale: float | None = None) -> tuple[Tensor, Tensor | None]:
    """Chunkwise form of scalar-gated linear attention (RetNet's chunkwise retention with a
    data-dependent decay; Sun et al. 2023 eq. 7). g: (B, T, H) log gates."""
    _check(q, k, v, g, 3)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dtype = v.dtype
    q, k, v, g = _upcast(q, k, v, g)
    t = q.shape[1]
    qc, kc, vc = (to_chunks(z, chunk_size) for z in (q * _scale(q, scale), k, v))  # (B, H, N, C, *)
    b = to_chunks(g, chunk_size).cumsum(-1)  # (B, H, N, C): log decay from chunk start
    b_last = b[..., -1:]  # (B, H, N, 1)
    # Intra-chunk: (Q K^T ⊙ D) V with D_ij = exp(b_i - b_j), j <= i.
    scores = (qc @ kc.transpose(-1, -2)) * decay_matrix(b)  # (B, H, N, C, C)
    o = scores @ vc  # (B, H, N, C, V)
    # Inter-chunk: each chunk adds its keys decayed to the chunk end; queries read the
    # state entering the chunk, decayed to their position. Every exponent is <= 0.
    update = (kc * (b_last - b).exp()[..., None]).transpose(-1, -2) @ vc  # (B, H, N, K, V)
    states, final = scan_chunk_states(b_last.exp()[..., None], update, initial_state)
    o = o + (qc * b.exp()[..., None]) @ states
    return from_chunks(o, t).to(dtype), (final.to(dtype) if output_final_state else None)


def _sub_chunk(chunk_size: int, sub_chunk_size: int | None) -> int:
    """The largest divisor of C not above ``sub_chunk_size`` (default SUB_CHUNK)."""
    limit = min(chunk_size, sub_chunk_size or SUB_CHUNK)
    return max(d for d in range(1, limit + 1) if chunk_size % d == 0)


# Largest half-range of in-chunk cumulative log gates for which the factored form keeps
# both exp factors (at most exp(+-limit)) far from overflow / underflow.
FACTORED_LIMIT = {torch.float32: 20.0, torch.float64: 200.0}


def _scores_factored(qc: Tensor, kc: Tensor, b: Tensor, ref: Tensor) -> Tensor:
    """exp(b_i - b_j) = exp(b_i - ref) exp(ref - b_j): one matmul per chunk.
    qc, kc, b: (B, H, N, C, K), ref: (B, H, N, 1, K) -> scores (B, H, N, C, C), causal."""
    scores = (qc * (b - ref).exp()) @ (kc * (ref - b).exp()).transpose(-1, -2)  # (B, H, N, C, C)
    mask = causal_mask(scores.shape[-1], device=scores.device)
    return scores.masked_fill(~mask, 0.0)


def _scores_secondary(qc: Tensor, kc: Tensor, b: Tensor, c: int) -> Tensor:
    """Secondary chunking (paper sec. 4.3), stable for any gates. qc, kc, b: (B, H, N, C, K)
    -> scores (B, H, N, C, C), causal.

    Blocks between query sub-chunk I and an earlier key sub-chunk J are matmuls of
    q_i exp(b_i - r_J) and k_j exp(r_J - b_j), r_J = b at the end of J (both exponents <= 0).
    Diagonal blocks are factored around their own mid-range where that is safe, and use
    the exact elementwise sum_k q_ik k_jk exp(b_ik - b_jk) in sub-chunks where it is not.
    """
    m = qc.shape[-2] // c
    limit = FACTORED_LIMIT.get(qc.dtype, 20.0)
    qs, ks, bs = (rearrange(z, "b h n (m c) k -> b h n m c k", c=c) for z in (qc, kc, b))  # (B, H, N, m, c, K)
    ref = bs[..., -1, :]  # (B, H, N, m, K): r_J
    k_ref = ks * (ref[..., None, :] - bs).exp()  # (B, H, N, J, c, K)
    later = torch.ones(m, m, dtype=torch.bool, device=qc.device).tril(-1)  # (I, J): I > J
    expo = bs[..., :, None, :, :] - ref[..., None, :, None, :]  # (B, H, N, I, J, c, K)
    expo = expo.masked_fill(~later[:, :, None, None], float("-inf"))
    q_ref = qs[..., :, None, :, :] * expo.exp()  # (B, H, N, I, J, c, K)
    scores = torch.einsum("bhnijck,bhnjdk->bhnicjd", q_ref, k_ref)  # (B, H, N, I, c, J, c)

    hi, lo = bs.detach().amax(-2, keepdim=True), bs.detach().amin(-2, keepdim=True)  # (B, H, N, m, 1, K)
    # Clamped so that unsafe sub-chunks stay finite (they are overwritten below).
    centred = (bs - (hi + lo) / 2).clamp(-limit, limit)  # (B, H, N, m, c, K)
    diag = (qs * centred.exp()) @ (ks * (-centred).exp()).transpose(-1, -2)  # (B, H, N, m, c, c)
    inside = causal_mask(c, device=qc.device)
    diag = diag.masked_fill(~inside, 0.0)
    unsafe = (hi - lo).amax(-1)[..., 0] / 2 > limit  # (B, H, N, m)
    if bool(unsafe.any()):
        qu, ku, bu = qs[unsafe], ks[unsafe], bs[unsafe]  # (P, c, K): the unsafe sub-chunks only
        diff = (bu[:, :, None, :] - bu[:, None, :, :]).masked_fill(~inside[:, :, None], float("-inf"))  # (P, c, c, K)
        exact = (qu[:, :, None, :] * ku[:, None, :, :] * diff.exp()).sum(-1)  # (P, c, c)
        diag = diag.masked_scatter(unsafe[..., None, None].expand_as(diag), exact)
    eye = torch.eye(m, dtype=qc.dtype, device=qc.device)
    scores = scores + torch.einsum("bhnicd,ij->bhnicjd", diag, eye)
    return rearrange(scores, "b h n i c j d -> b h n (i c) (j d)")  # (B, H, N, C, C)


def gla_chunked(q: Tensor, k: Tensor, v: Tensor, g: Tensor, *, chunk_size: int = 64,
                initial_state: Tensor | None = None, output_final_state: bool = False,
                scale: float | None = None, intra: str = "auto",
                sub_chunk_size: int | None = None) -> tuple[Tensor, Tensor | None]:
    """Chunkwise GLA (paper sec. 4.2-4.3). g: (B, T, H, K) log gates.

    Inside a chunk, with b the in-chunk cumulative log gates, query i scores key j <= i with
    sum_k q_ik k_jk exp(b_ik - b_jk). Two evaluations of that same sum:
    ``"factored"``: one matmul of q exp(b - ref) and k exp(ref - b), ref the mid-range of b
    per chunk and key dim; exact unless a factor overflows, i.e. while the chunk's gates
    decay by less than exp(-2 * FACTORED_LIMIT). ``"secondary"``: the paper's secondary
    chunking (sub-chunks of ``sub_chunk_size``, default 16), stable for any gates.
    ``"auto"`` (default) takes the factored form when every chunk is within the limit.
    """
    _check(q, k, v, g, 4)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if intra not in ("auto", "factored", "secondary"):
        raise ValueError(f"intra: expected 'auto', 'factored' or 'secondary', got {intra!r}")
    dtype = v.dtype
    q, k, v, g = _upcast(q, k, v, g)
    t = q.shape[1]
    qc, kc, vc = (to_chunks(z, chunk_size) for z in (q * _scale(q, scale), k, v))  # (B, H, N, C, *)
    b = to_chunks(g, chunk_size).cumsum(-2)  # (B, H, N, C, K): log decay from chunk start
    b_last = b[..., -1:, :]  # (B, H, N, 1, K)

    # The reference cancels mathematically, so it carries no gradient.
    hi, lo = b.detach().amax(-2, keepdim=True), b.detach().amin(-2, keepdim=True)  # (B, H, N, 1, K)
    if intra == "auto":
        half_range = float((hi - lo).max()) / 2 if b.numel() else 0.0
        intra = "factored" if half_range <= FACTORED_LIMIT.get(b.dtype, 20.0) else "secondary"
    if intra == "factored":
        scores = _scores_factored(qc, kc, b, (hi + lo) / 2)
    else:
        scores = _scores_secondary(qc, kc, b, _sub_chunk(chunk_size, sub_chunk_size))
    o = scores @ vc  # (B, H, N, C, V)

    # Inter-chunk state passing, as in simple_gla but with a decay per key dim.
    update = (kc * (b_last - b).exp()).transpose(-1, -2) @ vc  # (B, H, N, K, V)
    decay = rearrange(b_last.exp(), "b h n 1 k -> b h n k 1")  # (B, H, N, K, 1)
    states, final = scan_chunk_states(decay, update, initial_state)
    o = o + (qc * b.exp()) @ states
    return from_chunks(o, t).to(dtype), (final.to(dtype) if output_final_state else None)


# -- public ops -----------------------------------------------------------------------------
def gla(q: Tensor, k: Tensor, v: Tensor, g: Tensor, *, chunk_size: int = 64,
        initial_state: Tensor | None = None, output_final_state: bool = False,
        scale: float | None = None) -> tuple[Tensor, Tensor | None]:
    """Gated linear attention, chunked reference form. q, k, g: (B, T, H, K), g = log alpha,
    v: (B, T, H, V); initial_state: (B, H, K, V). Returns (o: (B, T, H, V), final state)."""
    return gla_chunked(q, k, v, g, chunk_size=chunk_size, initial_state=initial_state,
                       output_final_state=output_final_state, scale=scale)


def simple_gla(q: Tensor, k: Tensor, v: Tensor, g: Tensor, *, chunk_size: int = 64,
               initial_state: Tensor | None = None, output_final_state: bool = False,
               scale: float | None = None) -> tuple[Tensor, Tensor | None]:
    """Scalar-gated linear attention, chunked reference form. g: (B, T, H) log gates."""
    return simple_gla_chunked(q, k, v, g, chunk_size=chunk_size, initial_state=initial_state,
                              output_final_state=output_final_state, scale=scale)
