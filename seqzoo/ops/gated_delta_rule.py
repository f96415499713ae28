"""The gated delta rule of Gated DeltaNet (Yang, Kautz & Hatamizadeh 2024, "Gated Delta
Networks: Improving Mamba2 with Delta Rule", eq. 10): a readable per-token recurrence and
the chunked form through the WY/UT representation extended with decay (their section 3.3).

Per head, with the state S ∈ R^{K×V} and the log decay g_t = log α_t ≤ 0:

    S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ,       o_t = S_tᵀ (scale · q_t).

Layout: q, k (B, T, H, K), v (B, T, H, V), g, beta (B, T, H), state (B, H, K, V).
"""

from __future__ import annotations

from torch import Tensor

from seqzoo.ops.delta_rule import _recurrent, chunk_delta_rule, delta_rule_step

__all__ = ["gated_delta_rule", "gated_delta_rule_chunked", "gated_delta_rule_recurrent",
           "gated_delta_rule_step"]


def gated_delta_rule_step(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor, *,
                          scale: float | None = None) -> tuple[Tensor, Tensor]:
    """One token: q, k (B, H, K), v (B, H, V), g, beta (B, H), state (B, H, K, V)."""
    return delta_rule_step(q, k, v, beta, state, g=g, scale=scale)


def gated_delta_rule_recurrent(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *,
                               initial_state: Tensor | None = None, output_final_state: bool = False,
                               scale: float | None = None) -> tuple[Tensor, Tensor | None]:
    """Token-by-token gated delta rule: decay the state by α_t = e^{g_t}, then the delta update."""
    return _recurrent(q, k, v, beta, g, initial_state=initial_state,
                      output_final_state=output_final_state, scale=scale)


def gated_delta_rule_chunked(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *,
                             chunk_size: int = 64, initial_state: Tensor | None = None,
                             output_final_state: bool = False,
                             scale: float | None = None) -> tuple[Tensor, Tensor | None]:
    """Chunked gated delta rule: the UT transform with the decay mask e^{γ_t−γ_s} folded into
    the intra-chunk matrices (see ``seqzoo.ops.delta_rule.chunk_delta_rule``)."""
    return chunk_delta_rule(q, k, v, beta, g, chunk_size=chunk_size, initial_state=initial_state,
                            output_final_state=output_final_state, scale=scale)


def gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *, chunk_size: int = 64,
                     initial_state: Tensor | None = None, output_final_state: bool = False,
                     scale: float | None = None) -> tuple[Tensor, Tensor | None]:
    """The gated delta rule, chunked form; g is the log of the decay α_t, shape (B, T, H).
    Returns o (B, T, H, V) and the final state (B, H, K, V) if ``output_final_state``."""
    return gated_delta_rule_chunked(q, k, v, g, beta, chunk_size=chunk_size, initial_state=initial_state,
                                    output_final_state=output_final_state, scale=scale)
