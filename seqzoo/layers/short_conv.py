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

    def forward(self, x: Tensor, state: Tensor | None = None, *, kernel: bool = False) -> tuple[Tensor, Tensor]:
        """x: (B, T, D) -> (B, T, D), new state (B, D, kernel_size - 1). ``kernel``: run on
        causal-conv1d's CUDA kernel (``seqzoo.kernels.causal_conv1d``), chosen by the mixer."""
        if state is None:
            state = self.init_state(x.shape[0], device=x.device, dtype=x.dtype)
        if x.shape[1] == 0:  # nothing to mix: the window is unchanged
            return x, state
        if kernel:
            from seqzoo.kernels.causal_conv1d import causal_conv1d

            return causal_conv1d(x, self.conv.weight, self.conv.bias, state, activation=self.activation)
        k, T = self.kernel_size, x.shape[1]
        padded = torch.cat([rearrange(state.to(x.dtype), "b d k -> b k d"), x], dim=1)  # (B, k-1+T, D)
        # y_t = sum_j w_j x_{t-(k-1)+j}: k shifted multiply-adds in the (B, T, D) layout, which
        # on CPU is about twice as fast as a depthwise conv1d (forward and backward) and
        # needs no transposes.
        weight = rearrange(self.conv.weight, "d 1 k -> k d")
        y = padded[:, k - 1:] * weight[k - 1]
        for j in range(k - 1):  # in place: one (B, T, D) buffer, not k (autograd needs none of them)
            y.addcmul_(padded[:, j:j + T], weight[j])
        if self.conv.bias is not None:
            y.add_(self.conv.bias)
        new_state = rearrange(padded[:, padded.shape[1] - (k - 1):], "b k d -> b d k").contiguous()
        return self._act(y), new_state

    def step(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, D) -> (B, D), new state."""
        window = torch.cat([state.to(x.dtype), x.unsqueeze(-1)], dim=-1)  # (B, D, k)
        weight = rearrange(self.conv.weight, "d 1 k -> d k")
        y = (window * weight).sum(-1)
        if self.conv.bias is not None:
            y = y + self.conv.bias
        return self._act(y), window[..., 1:]
