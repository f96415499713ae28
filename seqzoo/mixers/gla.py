"""Gated linear attention layer (Yang, Wang, Shen, Panda, Kim 2024, "Gated Linear Attention
Transformers with Hardware-Efficient Training", sec. 4.4):

    q = x W_Q, k = x W_K (key width expand_k * d, paper 0.5), v = x W_V (expand_v * d, paper 1)
    alpha_t = sigmoid(x_t W_a1 W_a2 + b_a)^(1/tau)       low-rank (16) gate, temperature tau = 16
    S_t = Diag(alpha_t) S_{t-1} + k_t^T v_t,  o_t = q_t S_t / sqrt(K)       per head
    r_t = swish(x_t W_r + b_r),  y_t = (r_t ⊙ LN(o_t)) W_O                 LN per head
                                              (``output_norm: rms``: fla's per-head RMSNorm)

The gate lives in log space: log alpha_t = logsigmoid(x_t W_a1 W_a2 + b_a) / tau, which is what
the ops take. ``forward`` runs the chunked form (secondary chunking, paper sec. 4.3),
``step`` the recurrence; the state is the (K, V) memory per head. Backend "fla":
flash-linear-attention's chunked GLA kernel (states in and out).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import Field
from torch import Tensor, nn

from seqzoo.layers.norms import apply_head_norm, head_norm
from seqzoo.limits import MAX_EXPANSION
from seqzoo.mixers.base import ConfigError, MixerConfig, TokenMixer, register
from seqzoo.ops.gla import gla, gla_step


class GLAConfig(MixerConfig):
    n_heads: int = Field(4, ge=1)
    expand_k: float = Field(0.5, gt=0, le=MAX_EXPANSION, description="key width = expand_k * d_model (paper: 0.5)")
    expand_v: float = Field(1.0, gt=0, le=MAX_EXPANSION, description="value width = expand_v * d_model (paper: 1)")
    gate_low_rank: int = Field(16, ge=1, description="rank of the gate projection W_a1 W_a2")
    gate_temperature: float = Field(16.0, gt=0, description="tau: log alpha = logsigmoid(.) / tau")
    chunk_size: int = Field(64, ge=1, description="chunk length C of the chunked form")
    norm_eps: float = Field(1e-5, gt=0)
    output_norm: Literal["group", "rms"] = Field(
        "group", description="per-head output norm: the paper's LayerNorm (GroupNorm), or fla's RMSNorm")

    def widths(self, d_model: int) -> tuple[int, int]:
        return int(round(self.expand_k * d_model)), int(round(self.expand_v * d_model))

    def check(self, d_model: int) -> None:
        for key, expand, width in zip(("expand_k", "expand_v"), (self.expand_k, self.expand_v), self.widths(d_model)):
            if abs(expand * d_model - width) > 1e-6 or width < self.n_heads or width % self.n_heads:
                raise ConfigError(key, f"{key} * d_model = {expand * d_model} must be an integer divisible by "
                                       f"n_heads={self.n_heads}")


class GLAState(NamedTuple):
    memory: Tensor  # (B, H, K, V) the gated linear attention state S


@register
class GLA(TokenMixer):
    name = "gla"
    Config = GLAConfig
    backends = ("fla",)
    test_space = {"n_heads": [1, 2, 4], "chunk_size": [1, 3, 8, 32], "expand_k": [0.5, 1.0],
                  "output_norm": ["group", "rms"]}

    def __init__(self, config: GLAConfig, *, d_model: int, layer_idx: int = 0) -> None:
        super().__init__(config, d_model=d_model, layer_idx=layer_idx)
        key_dim, value_dim = config.widths(d_model)
        self.n_heads = config.n_heads
        self.head_k, self.head_v = key_dim // config.n_heads, value_dim // config.n_heads
        self.q_proj = nn.Linear(d_model, key_dim, bias=False)
        self.k_proj = nn.Linear(d_model, key_dim, bias=False)
        self.v_proj = nn.Linear(d_model, value_dim, bias=False)
        self.gate_down = nn.Linear(d_model, config.gate_low_rank, bias=False)  # W_a1
        self.gate_up = nn.Linear(config.gate_low_rank, key_dim, bias=True)  # W_a2, b_a
        self.r_proj = nn.Linear(d_model, value_dim, bias=True)  # W_r, b_r
        self.out = nn.Linear(value_dim, d_model, bias=False)
        self.norm = head_norm(config.n_heads, self.head_v, kind=config.output_norm, eps=config.norm_eps)

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> GLAState:
        return GLAState(torch.zeros(batch_size, self.n_heads, self.head_k, self.head_v, device=device, dtype=dtype))

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x: (B, T, D) -> q, k, log alpha: (B, T, H, K) and v: (B, T, H, V)."""
        q = rearrange(self.q_proj(x), "b t (h k) -> b t h k", h=self.n_heads)  # (B, T, H, K)
        k = rearrange(self.k_proj(x), "b t (h k) -> b t h k", h=self.n_heads)  # (B, T, H, K)
        v = rearrange(self.v_proj(x), "b t (h v) -> b t h v", h=self.n_heads)  # (B, T, H, V)
        logits = self.gate_up(self.gate_down(x))
        g = F.logsigmoid(logits) / self.config.gate_temperature
        g = rearrange(g, "b t (h k) -> b t h k", h=self.n_heads)  # (B, T, H, K)
        return q, k, v, g

    def _output(self, o: Tensor, x: Tensor) -> Tensor:
        """o: (B, T, H, V) -> per-head norm, swish gate r, out projection -> (B, T, D)."""
        return self.out(F.silu(self.r_proj(x)) * apply_head_norm(self.norm, o))

    def forward(self, x: Tensor, state: GLAState | None = None) -> tuple[Tensor, GLAState]:
        state = state if state is not None else self.default_state(x)
        q, k, v, g = self._project(x)
        if self.backend == "fla":
            from seqzoo.kernels.fla_linear import fla_gla

            o, memory = fla_gla(q, k, v, g, initial_state=state.memory, output_final_state=True)
        else:
            o, memory = gla(q, k, v, g, chunk_size=self.config.chunk_size, initial_state=state.memory,
                            output_final_state=True)
        return self._output(o, x), GLAState(memory)

    def step(self, x: Tensor, state: GLAState) -> tuple[Tensor, GLAState]:
        q, k, v, g = self._project(x[:, None])  # (B, 1, H, *)
        o, memory = gla_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], state.memory)  # (B, H, V)
        return self._output(o[:, None], x[:, None])[:, 0], GLAState(memory)
