"""mamba-ssm's kernels (Gu & Dao 2023; Dao & Gu 2024; github.com/state-spaces/mamba) with
the signatures of seqzoo's references: the fused selective scan of Mamba (CUDA) and the
chunked SSD scan of Mamba2 (``mamba_chunk_scan_combined``, Triton). CUDA only: on CPU they
are never chosen and their tests skip; ``scan_fn`` / ``ssd_fn`` let the CPU suite prove the
glue around them with a stand-in of the same signature.

The selective-scan kernel has no initial-state input. The scan is linear in its state, so
starting from h0 instead of 0 adds, per channel d and state n,

    y_t  += C_t[n] · exp(A[d, n] · Σ_{s≤t} Δ_s[d]) · h0[d, n]        (summed over n)
    h_T  += exp(A[d, n] · Σ_{s≤T} Δ_s[d]) · h0[d, n]

which is added here (exponents ≤ 0: nothing overflows), so chaining and decoding continue
a kernel forward exactly. The SiLU(z) gate is applied after that sum, outside the kernel.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from seqzoo.kernels.library import KernelOp, state_dtype

SSD_CHUNK = 256  # mamba-ssm's default chunk length; the result does not depend on it
_STATE_CHUNK = 64  # tokens per slice of the initial-state correction: bounds its (B, D, T, N) memory


def _selective_scan_fn() -> Callable[..., tuple[Tensor, Tensor]]:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    return selective_scan_fn


def _scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, delta_bias: Tensor,
          softplus: bool, fn: Callable[..., tuple[Tensor, Tensor]] | None = None) -> tuple[Tensor, Tensor]:
    # The kernel wants A, D and the Δ bias in fp32 whatever the activations' dtype.
    y, last = (fn or _selective_scan_fn())(u, delta, A.float(), B, C, D.float(), None, delta_bias.float(), softplus,
                                           return_last_state=True)
    return y, last.float()


def _scan_fake(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, delta_bias: Tensor,
               softplus: bool) -> tuple[Tensor, Tensor]:
    return u.new_empty(u.shape), u.new_empty((u.shape[0], u.shape[1], A.shape[1]), dtype=torch.float32)


SELECTIVE_SCAN = KernelOp("mamba_ssm_selective_scan", _scan, tensors=["u", "delta", "A", "B", "C", "D", "delta_bias"],
                          scalars=[("bool", "softplus")], n_outputs=2, fake=_scan_fake)


def _initial_state_terms(delta: Tensor, A: Tensor, C: Tensor, h0: Tensor) -> tuple[Tensor, Tensor]:
    """What h0 adds: to y, (B, D, T), and to the final state, (B, D, N). delta: (B, D, T)
    after bias and softplus, A: (D, N), C: (B, N, T) or (B, G, N, T), h0: (B, D, N)."""
    b, d, t = delta.shape
    cum = delta.float().cumsum(-1)  # (B, D, T)
    cg = C.float() if C.dim() == 4 else C.float()[:, None]  # (B, G, N, T)
    h0g = rearrange(h0.float(), "b (g c) n -> b g c n", g=cg.shape[1])  # (B, G, D/G, N)
    a = rearrange(A.float(), "(g c) n -> g c n", g=cg.shape[1])  # (G, D/G, N)
    cumg = rearrange(cum, "b (g c) t -> b g c t", g=cg.shape[1])  # (B, G, D/G, T)
    pieces = []
    for lo in range(0, t, _STATE_CHUNK):
        decay = torch.exp(cumg[..., lo:lo + _STATE_CHUNK, None] * a[None, :, :, None, :])  # (B, G, D/G, t, N)
        pieces.append(torch.einsum("bgctn,bgcn,bgnt->bgct", decay, h0g, cg[..., lo:lo + _STATE_CHUNK]))
    y0 = rearrange(torch.cat(pieces, -1), "b g c t -> b (g c) t")  # (B, D, T)
    h_end = torch.exp(cum[..., -1:] * A.float()) * h0.float()  # (B, D, N)
    return y0, h_end


def selective_scan_mamba_ssm(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                             D: Tensor | None = None, z: Tensor | None = None,
                             delta_bias: Tensor | None = None, delta_softplus: bool = False,
                             initial_state: Tensor | None = None, return_final_state: bool = False, *,
                             scan_fn: Callable[..., tuple[Tensor, Tensor]] | None = None
                             ) -> Tensor | tuple[Tensor, Tensor]:
    """Mamba's selective scan on mamba-ssm's fused kernel, with the arguments and result of
    ``seqzoo.ops.selective_scan.selective_scan`` (layouts there). B, C must be time-varying,
    (B, N, T) or (B, G, N, T), as in Mamba."""
    if B.dim() == 2 or C.dim() == 2:
        raise ValueError("the mamba_ssm binding takes time-varying B, C: (B, N, T) or (B, G, N, T)")
    zeros = u.new_zeros(u.shape[1], dtype=torch.float32)
    D_ = D if D is not None else zeros
    bias = delta_bias if delta_bias is not None else zeros
    if scan_fn is None:
        y, last = SELECTIVE_SCAN(u, delta, A, B, C, D_, bias, delta_softplus)
    else:
        y, last = _scan(u, delta, A, B, C, D_, bias, delta_softplus, fn=scan_fn)
    if initial_state is not None:
        dt = delta.float() + bias.float()[:, None]
        dt = F.softplus(dt) if delta_softplus else dt
        y0, h_end = _initial_state_terms(dt, A, C, initial_state)
        y, last = (y.float() + y0).to(u.dtype), last + h_end
    if z is not None:
        y = (y.float() * F.silu(z.float())).to(u.dtype)
    if not return_final_state:
        return y
    return y, last.to(initial_state.dtype if initial_state is not None else state_dtype(u))


def _ssd_fn() -> Callable[..., tuple[Tensor, Tensor]]:
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    return mamba_chunk_scan_combined


def _ssd(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, h0: Tensor,
         fn: Callable[..., tuple[Tensor, Tensor]] | None = None) -> tuple[Tensor, Tensor]:
    y, final = (fn or _ssd_fn())(x, dt, A.float(), B, C, SSD_CHUNK, D=D.float(), initial_states=h0,
                                 return_final_states=True)
    return y.to(x.dtype), final.float()


def _ssd_fake(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor,
              h0: Tensor) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape), h0.new_empty(h0.shape, dtype=torch.float32)


SSD = KernelOp("mamba_ssm_ssd", _ssd, tensors=["x", "dt", "A", "B", "C", "D", "h0"], scalars=[], n_outputs=2,
               fake=_ssd_fake)


def ssd_mamba_ssm(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *, D: Tensor | None = None,
                  initial_state: Tensor | None = None, output_final_state: bool = False,
                  ssd_fn: Callable[..., tuple[Tensor, Tensor]] | None = None) -> tuple[Tensor, Tensor | None]:
    """Mamba2's SSD on mamba-ssm's chunked Triton kernel, with the arguments and result of
    ``seqzoo.ops.ssd.ssd`` (dt already positive: no softplus or bias inside the kernel)."""
    b, _, h, p = x.shape
    h0 = (initial_state.float() if initial_state is not None
          else torch.zeros(b, h, p, B.shape[-1], dtype=torch.float32, device=x.device))  # (B, H, P, N)
    D_ = D if D is not None else x.new_zeros(h, dtype=torch.float32)
    args = (x, dt.float(), A, B.to(x.dtype), C.to(x.dtype), D_, h0)
    y, final = SSD(*args) if ssd_fn is None else _ssd(*args, fn=ssd_fn)
    if not output_final_state:
        return y, None
    return y, final.to(initial_state.dtype if initial_state is not None else x.dtype)
