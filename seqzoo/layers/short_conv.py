"""Short causal depthwise convolution (kernel 4 by default) with an explicit decode state.

Used on q/k/v by DeltaNet, Gated DeltaNet and Titans, and on x by Mamba / Mamba2.
The state is the last ``kernel_size - 1`` inputs, so chunked calls and token-by-token
decoding give exactly the same outputs as one call over the whole sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


class ShortConv(nn.Module):
    def __init__(self, dim: int, *, kernel_size: int = 4, activation: str | None = "silu",
                 bias: bool = False) -> None:
        super().__init__()
        if activation not in (None, "silu"):
            raise ValueError(f"activation: expected None or 'silu', got {activation!r}")
        self.dim = dim
        self.kernel_size = kernel_size
        self.activation = activation
        self.conv = nn.Conv1d(dim, dim, kernel_size, groups=dim, bias=bias)

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> Tensor:
        # (B, D, kernel_size - 1): the most recent inputs, oldest first
        return torch.zeros(batch_size, self.dim, self.kernel_size - 1, device=device, dtype=dtype)

    def _act(self, y: Tensor) -> Tensor:
        return F.silu(y) if self.activation == "silu" else y

    def forward(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x: (B, T, D) -> (B, T, D), new state (B, D, kernel_size - 1)."""
        if state is None:
            state = self.init_state(x.shape[0], device=x.device, dtype=x.dtype)
        if x.shape[1] == 0:  # nothing to mix: the window is unchanged
            return x, state
        xt = rearrange(x, "b t d -> b d t")
        padded = torch.cat([state.to(xt.dtype), xt], dim=-1)  # (B, D, k-1+T)
        y = F.conv1d(padded, self.conv.weight, self.conv.bias, groups=self.dim)  # (B, D, T)
        new_state = padded[..., padded.shape[-1] - (self.kernel_size - 1):]
        return self._act(rearrange(y, "b d t -> b t d")), new_state

    def step(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, D) -> (B, D), new state."""
        window = torch.cat([state.to(x.dtype), x.unsqueeze(-1)], dim=-1)  # (B, D, k)
        weight = rearrange(self.conv.weight, "d 1 k -> d k")
        y = (window * weight).sum(-1)
        if self.conv.bias is not None:
            y = y + self.conv.bias
        return self._act(y), window[..., 1:]
