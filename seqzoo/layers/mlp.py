"""The SwiGLU feed-forward of Transformer++ (Shazeer 2020)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def swiglu_hidden(d_model: int, ratio: float, multiple_of: int = 16) -> int:
    """LLaMA convention: 2/3 of ratio * d_model, rounded up to a multiple."""
    hidden = int(2 * ratio * d_model / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, *, ratio: float = 4.0, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or swiglu_hidden(d_model, ratio)
        self.w_in = nn.Linear(d_model, 2 * hidden, bias=False)
        self.w_out = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(F.silu(gate) * up)
