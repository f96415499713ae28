"""RMSNorm, the output-gated RMSNorm used by Mamba2, Gated DeltaNet and Titans, and the
per-head output norm of RetNet / GLA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


def l2_normalize(x: Tensor, *, eps: float = 1e-6) -> Tensor:
    """x / sqrt(||x||² + eps) over the last dim: the L2 norm of q, k in DeltaNet / Gated
    DeltaNet as their authors' release (flash-linear-attention's ``l2norm``) computes it,
    smooth at 0 (unlike x / max(||x||, eps))."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim (Zhang & Sennrich 2019), computed in fp32 for stability."""

    def __init__(self, dim: int, *, eps: float = 1e-6, affine: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float() if dtype in (torch.float16, torch.bfloat16) else x
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * self.weight.to(y.dtype)
        return y.to(dtype)


class GatedRMSNorm(nn.Module):
    """y = RMSNorm(x) * SiLU(z) (norm before gate, as Gated DeltaNet / Titans; Mamba2's
    ``norm_before_gate=False`` variant normalises x * SiLU(z) instead)."""

    def __init__(self, dim: int, *, eps: float = 1e-6, norm_before_gate: bool = True) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, eps=eps)
        self.norm_before_gate = norm_before_gate

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        if self.norm_before_gate:
            return self.norm(x) * F.silu(z)
        return self.norm(x * F.silu(z))


def head_norm(n_heads: int, head_dim: int, *, kind: str, eps: float) -> nn.Module:
    """The per-head output norm of RetNet / GLA: ``"group"``, the papers' GroupNorm with one
    group per head and a weight and bias per channel, or ``"rms"``, flash-linear-attention's
    RMSNorm over each head with one weight vector shared by the heads."""
    if kind == "group":
        return nn.GroupNorm(n_heads, n_heads * head_dim, eps=eps)
    if kind == "rms":
        return RMSNorm(head_dim, eps=eps)
    raise ValueError(f"output_norm: expected 'group' or 'rms', got {kind!r}")


def apply_head_norm(norm: nn.Module, o: Tensor) -> Tensor:
    """o: (B, T, H, V) -> the normalised heads, concatenated: (B, T, H*V)."""
    if isinstance(norm, nn.GroupNorm):
        flat = rearrange(o, "b t h v -> (b t) (h v)")  # (B*T, H*V): one norm group per head
        return rearrange(norm(flat), "(b t) c -> b t c", b=o.shape[0])  # (B, T, H*V)
    return rearrange(norm(o), "b t h v -> b t (h v)")  # (B, T, H*V)
