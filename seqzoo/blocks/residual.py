"""The pre-norm residual block: x + mixer(norm(x)), then x + mlp(norm(x)).

Built from factories (as mamba-ssm's Block): the block owns norms, residuals and the MLP;
the mixer only mixes tokens and carries its own decode state.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from seqzoo.layers.norms import RMSNorm
from seqzoo.mixers.base import State, TokenMixer


class Block(nn.Module):
    def __init__(self, d_model: int, *, mixer: TokenMixer, mlp_factory: Callable[[int], nn.Module] | None,
                 norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.mixer_norm = RMSNorm(d_model, eps=norm_eps)
        self.mixer = mixer
        self.mlp_norm = RMSNorm(d_model, eps=norm_eps) if mlp_factory else None
        self.mlp = mlp_factory(d_model) if mlp_factory else None

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """x: (B, T, D)."""
        y, state = self.mixer(self.mixer_norm(x), state)
        x = x + y
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x))
        return x, state

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        """x: (B, D)."""
        y, state = self.mixer.step(self.mixer_norm(x), state)
        x = x + y
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x))
        return x, state
