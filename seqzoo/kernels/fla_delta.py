"""flash-linear-attention's chunked (gated) delta-rule kernel (Yang, Kautz & Hatamizadeh
2024, "Gated Delta Networks"; the WY/UT form of Yang et al. 2024) with the signature of
``seqzoo.ops.delta_rule.chunk_delta_rule``.

DeltaNet runs on the same kernel with zero log-decay (alpha = 1): exactly the delta rule.
fla's own ``chunk_delta_rule`` refuses fp32 inputs at its entry point, the gated kernel
accepts them, and one kernel for both mixers is one binding to prove.
"""

from __future__ import annotations

import torch
from torch import Tensor

from seqzoo.kernels.fla_common import finish, fla_function, initial_state_fp32
from seqzoo.kernels.library import KernelOp


def _impl(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, h0: Tensor,
          scale: float) -> tuple[Tensor, Tensor]:
    o, final = fla_function("gated_delta_rule", "chunk_gated_delta_rule")(
        q, k, v, g, beta, scale=scale, initial_state=h0, output_final_state=True)
    return o.to(v.dtype), final.float()


def _fake(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, h0: Tensor,
          scale: float) -> tuple[Tensor, Tensor]:
    return v.new_empty(v.shape), h0.new_empty(h0.shape)


GATED_DELTA_RULE = KernelOp("fla_gated_delta_rule", _impl, tensors=["q", "k", "v", "g", "beta", "h0"],
                            scalars=[("float", "scale")], n_outputs=2, fake=_fake)


def fla_delta_rule(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None = None, *,
                   initial_state: Tensor | None = None, output_final_state: bool = False,
                   scale: float | None = None) -> tuple[Tensor, Tensor | None]:
    """The (gated) delta rule on fla's kernel. q, k: (B, T, H, K), v: (B, T, H, V),
    beta, g: (B, T, H) (g = log alpha; None for DeltaNet), state (B, H, K, V)."""
    b, _, h, dk = q.shape
    h0 = initial_state_fp32(initial_state, (b, h, dk, v.shape[-1]), q)
    g = torch.zeros(q.shape[:3], dtype=torch.float32, device=q.device) if g is None else g.float()
    scale = dk ** -0.5 if scale is None else scale
    o, final = GATED_DELTA_RULE(q, k, v.to(q.dtype), g, beta.to(q.dtype), h0, float(scale))
    return finish(o, final, v, initial_state, output_final_state)
