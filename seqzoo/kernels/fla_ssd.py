"""Mamba2's SSD (Dao & Gu 2024, "Transformers are SSMs") on flash-linear-attention's simple
GLA kernel: SSD *is* scalar-gated linear attention (the paper's state space duality),

    q = C,  k = B,  v = dt · x,  log gate = dt · A,  scale 1,  state S = hᵀ: (B, H, N, P),

with B, C repeated from their G groups to the H heads, and the D skip added outside the
kernel. Same signature and result as ``seqzoo.ops.ssd.ssd`` (states (B, H, P, N)).
"""

from __future__ import annotations

from einops import rearrange, repeat
from torch import Tensor

from seqzoo.kernels.fla_linear import fla_simple_gla


def fla_ssd(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *, D: Tensor | None = None,
            initial_state: Tensor | None = None,
            output_final_state: bool = False) -> tuple[Tensor, Tensor | None]:
    """x: (B, T, H, P), dt: (B, T, H) positive, A: (H,), B, C: (B, T, G, N),
    D: (H,) or (H, P), initial_state: (B, H, P, N)."""
    r = x.shape[2] // B.shape[2]
    q = repeat(C, "b t g n -> b t (g r) n", r=r).to(x.dtype)  # (B, T, H, N)
    k = repeat(B, "b t g n -> b t (g r) n", r=r).to(x.dtype)  # (B, T, H, N)
    v = x * dt[..., None].to(x.dtype)  # (B, T, H, P)
    h0 = rearrange(initial_state, "b h p n -> b h n p") if initial_state is not None else None  # (B, H, N, P)
    y, final = fla_simple_gla(q, k, v, dt.float() * A.float(), initial_state=h0,
                              output_final_state=output_final_state, scale=1.0)
    if D is not None:
        y = y + x * (D[:, None] if D.dim() == 1 else D).to(x.dtype)
    return y, (rearrange(final, "b h n p -> b h p n") if final is not None else None)  # (B, H, P, N)
