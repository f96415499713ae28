"""Multi-scale retention, the token mixer of RetNet (Sun et al. 2023, "Retentive Network: A
Successor to Transformer for Large Language Models", sec. 2.2):

    Q = rotary(X W_Q), K = rotary(X W_K), V = X W_V            (eq. 5, Θ = rotary / xPos angle)
    head_h = Retention(Q_h, K_h, V_h; gamma_h),  gamma_h = 1 - 2^(-5-h)
    Y = GroupNorm_H(concat(head_1 .. head_H))                   (one group per head; or
                                                                 ``output_norm: rms``, fla's per-head RMSNorm)
    MSR(X) = (swish(X W_G) ⊙ Y) W_O                             (eq. 8)

The value (and gate) width is ``expand_v * d_model`` (the paper uses 2d). ``forward`` runs
the chunkwise form (eq. 7), ``step`` the recurrence (eq. 6); the state is the (K, V) memory
per head and the absolute position (for the rotary phase). Backend "fla": flash-linear-
attention's chunked retention kernel (states in and out).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import Field
from torch import Tensor, nn

from seqzoo.layers.norms import apply_head_norm, head_norm
from seqzoo.layers.rotary import Rotary
from seqzoo.limits import MAX_EXPANSION
from seqzoo.mixers.base import ConfigError, MixerConfig, TokenMixer, register
from seqzoo.ops.retention import retention, retention_step


class RetNetConfig(MixerConfig):
    n_heads: int = Field(4, ge=1)
    expand_v: float = Field(2.0, gt=0, le=MAX_EXPANSION, description="value / gate width = expand_v * d_model (paper: 2)")
    chunk_size: int = Field(64, ge=1, description="chunk length C of the chunkwise form")
    rope_base: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0)
    output_norm: Literal["group", "rms"] = Field(
        "group", description="per-head output norm: the paper's GroupNorm, or fla's RMSNorm (loads fla weights)")

    def value_dim(self, d_model: int) -> int:
        return int(round(self.expand_v * d_model))

    def check(self, d_model: int) -> None:
        self.require_divisible("n_heads", self.n_heads, d_model)
        if (d_model // self.n_heads) % 2:
            raise ConfigError("n_heads", f"head dim d_model/n_heads={d_model // self.n_heads} must be even for rotary")
        dv = self.value_dim(d_model)
        if abs(self.expand_v * d_model - dv) > 1e-6 or dv % self.n_heads:
            raise ConfigError("expand_v", f"expand_v * d_model = {self.expand_v * d_model} must be an integer "
                                          f"divisible by n_heads={self.n_heads}")


class RetNetState(NamedTuple):
    memory: Tensor  # (B, H, K, V) the retention state S
    pos: int        # tokens seen so far (rotary phase of the next token)


@register
class RetNet(TokenMixer):
    name = "retnet"
    Config = RetNetConfig
    backends = ("fla",)
    test_space = {"n_heads": [1, 2, 4], "chunk_size": [1, 3, 8, 16], "expand_v": [1.0, 2.0],
                  "output_norm": ["group", "rms"]}

    def __init__(self, config: RetNetConfig, *, d_model: int, layer_idx: int = 0) -> None:
        super().__init__(config, d_model=d_model, layer_idx=layer_idx)
        self.n_heads = config.n_heads
        self.head_k = d_model // config.n_heads
        value_dim = config.value_dim(d_model)
        self.head_v = value_dim // config.n_heads
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, value_dim, bias=False)
        self.g_proj = nn.Linear(d_model, value_dim, bias=False)
        self.out = nn.Linear(value_dim, d_model, bias=False)
        self.rotary = Rotary(self.head_k, base=config.rope_base)
        self.norm = head_norm(config.n_heads, self.head_v, kind=config.output_norm, eps=config.norm_eps)

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> RetNetState:
        memory = torch.zeros(batch_size, self.n_heads, self.head_k, self.head_v, device=device, dtype=dtype)
        return RetNetState(memory, 0)

    def _project(self, x: Tensor, pos: int) -> tuple[Tensor, Tensor, Tensor]:
        """x: (B, T, D) -> rotated q, k: (B, T, H, K) and v: (B, T, H, V)."""
        q = rearrange(self.q_proj(x), "b t (h k) -> b t h k", h=self.n_heads)  # (B, T, H, K)
        k = rearrange(self.k_proj(x), "b t (h k) -> b t h k", h=self.n_heads)  # (B, T, H, K)
        v = rearrange(self.v_proj(x), "b t (h v) -> b t h v", h=self.n_heads)  # (B, T, H, V)
        return self.rotary(q, pos), self.rotary(k, pos), v

    def _output(self, o: Tensor, x: Tensor) -> Tensor:
        """o: (B, T, H, V) -> per-head norm, swish gate, out projection -> (B, T, D)."""
        return self.out(F.silu(self.g_proj(x)) * apply_head_norm(self.norm, o))

    def forward(self, x: Tensor, state: RetNetState | None = None) -> tuple[Tensor, RetNetState]:
        state = state if state is not None else self.default_state(x)
        q, k, v = self._project(x, state.pos)
        if self.backend == "fla":
            from seqzoo.kernels.fla_linear import fla_retention

            o, memory = fla_retention(q, k, v, initial_state=state.memory, output_final_state=True)
        else:
            o, memory = retention(q, k, v, chunk_size=self.config.chunk_size, initial_state=state.memory,
                                  output_final_state=True)
        return self._output(o, x), RetNetState(memory, state.pos + x.shape[1])

    def step(self, x: Tensor, state: RetNetState) -> tuple[Tensor, RetNetState]:
        q, k, v = self._project(x[:, None], state.pos)  # (B, 1, H, *)
        o, memory = retention_step(q[:, 0], k[:, 0], v[:, 0], state.memory)  # (B, H, V)
        y = self._output(o[:, None], x[:, None])[:, 0]
        return y, RetNetState(memory, state.pos + 1)
