"""Rotary position embedding (Su et al. 2021), half-split (GPT-NeoX) convention."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Rotary(nn.Module):
    def __init__(self, head_dim: int, *, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary needs an even head dim, got {head_dim}")
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: Tensor, offset: int | Tensor = 0) -> Tensor:
        """x: (B, T, H, K) at absolute positions offset .. offset+T-1."""
        t = x.shape[1]
        pos = torch.arange(t, device=x.device, dtype=torch.float64) + offset
        angles = torch.outer(pos, self.inv_freq.to(x.device))  # (T, K/2)
        cos = angles.cos().to(x.dtype)[None, :, None, :]  # (1, T, 1, K/2)
        sin = angles.sin().to(x.dtype)[None, :, None, :]
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
