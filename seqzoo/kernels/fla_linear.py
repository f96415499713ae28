"""flash-linear-attention's chunked kernels for gated linear attention (Yang et al. 2024,
"Gated Linear Attention Transformers with Hardware-Efficient Training"), its scalar-gate
form (simple GLA; Mamba2's SSD is one) and retention (Sun et al. 2023), with the
signatures of ``seqzoo.ops.gla`` / ``seqzoo.ops.retention``: they compute the same maths
as ``gla``, ``simple_gla`` and ``retention`` there (fla's chunk length is its own; the
result does not depend on it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from seqzoo.kernels.fla_common import finish, fla_function, initial_state_fp32
from seqzoo.kernels.library import KernelOp


def _state_shape(q: Tensor, v: Tensor) -> tuple[int, int, int, int]:
    return (q.shape[0], q.shape[2], q.shape[3], v.shape[3])  # (B, H, K, V)


def _fake(q: Tensor, k: Tensor, v: Tensor, g: Tensor, h0: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    return v.new_empty(v.shape), h0.new_empty(h0.shape)


def _gla(q: Tensor, k: Tensor, v: Tensor, g: Tensor, h0: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    o, final = fla_function("gla", "chunk_gla")(q, k, v, g, scale=scale, initial_state=h0, output_final_state=True)
    return o.to(v.dtype), final.float()


def _simple_gla(q: Tensor, k: Tensor, v: Tensor, g: Tensor, h0: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    o, final = fla_function("simple_gla", "chunk_simple_gla")(q, k, v, g=g, scale=scale, initial_state=h0,
                                                                 output_final_state=True)
    return o.to(v.dtype), final.float()


def _retention(q: Tensor, k: Tensor, v: Tensor, log_gamma: Tensor, h0: Tensor,
               scale: float) -> tuple[Tensor, Tensor]:
    # A constant decay per head is fla's ``g_gamma`` form of simple GLA: no gate tensor at all.
    o, final = fla_function("simple_gla", "chunk_simple_gla")(q, k, v, g_gamma=log_gamma, scale=scale,
                                                                 initial_state=h0, output_final_state=True)
    return o.to(v.dtype), final.float()


_SIGNATURE = dict(tensors=["q", "k", "v", "g", "h0"], scalars=[("float", "scale")], n_outputs=2, fake=_fake)
GLA = KernelOp("fla_gla", _gla, **_SIGNATURE)
SIMPLE_GLA = KernelOp("fla_simple_gla", _simple_gla, **_SIGNATURE)
RETENTION = KernelOp("fla_retention", _retention, **_SIGNATURE)


def _run(op: KernelOp, q: Tensor, k: Tensor, v: Tensor, g: Tensor, *, initial_state: Tensor | None,
         output_final_state: bool, scale: float | None) -> tuple[Tensor, Tensor | None]:
    h0 = initial_state_fp32(initial_state, _state_shape(q, v), q)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    o, final = op(q, k, v.to(q.dtype), g.float(), h0, float(scale))
    return finish(o, final, v, initial_state, output_final_state)


def fla_gla(q: Tensor, k: Tensor, v: Tensor, g: Tensor, *, initial_state: Tensor | None = None,
            output_final_state: bool = False, scale: float | None = None) -> tuple[Tensor, Tensor | None]:
    """GLA, fla's chunk kernel. q, k, g: (B, T, H, K) with g = log alpha, v: (B, T, H, V)."""
    return _run(GLA, q, k, v, g, initial_state=initial_state, output_final_state=output_final_state, scale=scale)


def fla_simple_gla(q: Tensor, k: Tensor, v: Tensor, g: Tensor, *, initial_state: Tensor | None = None,
                   output_final_state: bool = False, scale: float | None = None) -> tuple[Tensor, Tensor | None]:
    """Scalar-gated linear attention, fla's chunk kernel. g: (B, T, H) log gates."""
    return _run(SIMPLE_GLA, q, k, v, g, initial_state=initial_state, output_final_state=output_final_state,
                scale=scale)


def fla_retention(q: Tensor, k: Tensor, v: Tensor, *, initial_state: Tensor | None = None,
                  output_final_state: bool = False, scale: float | None = None) -> tuple[Tensor, Tensor | None]:
    """Multi-scale retention, gamma_h = 1 - 2^(-5-h) (seqzoo.ops.retention), fla's kernel."""
    from seqzoo.ops.retention import retention_log_decay

    log_gamma = retention_log_decay(q.shape[2], device=q.device, dtype=torch.float32)  # (H,)
    return _run(RETENTION, q, k, v, log_gamma, initial_state=initial_state, output_final_state=output_final_state,
                scale=scale)
