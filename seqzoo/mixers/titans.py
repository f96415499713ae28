"""Titans neural long-term memory (LMM) as a token mixer (Behrouz, Zhong & Mirrokni 2024,
"Titans: Learning to Memorize at Test Time", section 3 and section 4.4 "Architectural
Details"; DESIGN.md 5.9).

Per head: q, k, v = SiLU(short-conv(x W_{q,k,v})) with q, k L2-normalised; data-dependent
gates per token and head, theta_t = max_lr * sigmoid(.), eta_t = max_momentum * sigmoid(.),
alpha_t = max_forget * sigmoid(.); a memory MLP (depth 1-4, hidden = expansion * K, learnable
initial weights per head) trained at test time on ||M(k_t) - v_t||^2 with momentum and
forgetting (eq. 13-14, chunked gradients eq. 16-18, see ``seqzoo.ops.titans``); read-out
y_t = M_t(q_t); output RMSNorm and SiLU(x W_g) gate before the out-projection.

Ablation switches (the paper's table 5): ``linear_memory`` (L_M = 1), ``conv=False``,
``momentum=False`` (eta = 0), ``forgetting=False`` (alpha = 0). Persistent memory belongs to
the hybrid blocks (MAC / MAG / MAL), not to this mixer.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from pydantic import Field
from torch import Tensor, nn

from seqzoo.layers.norms import GatedRMSNorm
from seqzoo.layers.short_conv import ShortConv
from seqzoo.mixers.base import ConfigError, MixerConfig, TokenMixer, register
from seqzoo.ops.titans import ACTIVATIONS, TitansState, titans_memory


class TitansConfig(MixerConfig):
    n_heads: int = Field(4, ge=1)
    depth: int = Field(2, ge=1, le=4, description="memory MLP layers L_M (1 = matrix memory)")
    expansion: int = Field(4, ge=1, description="hidden width of the memory MLP / head dim")
    activation: str = "silu"
    residual: bool = Field(False, description="residual memory M(x) = x + MLP(x)")
    chunk_size: int = Field(64, ge=1, description="tokens per chunk b (gradients at chunk-start weights)")
    read: Literal["token", "chunk_start"] = "token"
    # Stability: a chunk takes all its gradients at one point, so for repeated keys the
    # chunk's step is about theta * chunk_size / (1 - eta) times the curvature 2||k||^2 = 2;
    # the defaults keep that below 1 at chunk_size 64 (and a 64K-token stream finite).
    max_lr: float = Field(0.01, gt=0, description="theta_t = max_lr * sigmoid(.)")
    max_momentum: float = Field(1.0, gt=0, le=1, description="eta_t = max_momentum * sigmoid(.)")
    max_forget: float = Field(1.0, gt=0, le=1, description="alpha_t = max_forget * sigmoid(.)")
    init_lr: float = Field(0.2, gt=0, lt=1, description="initial theta_t / max_lr")
    init_momentum: float = Field(0.9, gt=0, lt=1, description="initial eta_t / max_momentum")
    init_forget: float = Field(0.001, gt=0, lt=1, description="initial alpha_t / max_forget")
    conv: bool = Field(True, description="short causal depthwise conv on q, k, v")
    conv_size: int = Field(4, ge=1)
    momentum: bool = Field(True, description="False: eta = 0 (ablation)")
    forgetting: bool = Field(True, description="False: alpha = 0 (ablation)")
    linear_memory: bool = Field(False, description="ablation: a matrix memory (L_M = 1)")

    def check(self, d_model: int) -> None:
        self.require_divisible("n_heads", self.n_heads, d_model)
        if self.activation not in ACTIVATIONS:
            raise ConfigError("activation", f"expected one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.linear_memory and "depth" in self.model_fields_set and self.depth != 1:
            raise ConfigError("depth", f"linear_memory means depth 1, got depth={self.depth}")

    @property
    def memory_depth(self) -> int:
        return 1 if self.linear_memory else self.depth


class TitansMixerState(NamedTuple):
    conv: Tensor          # (B, 3D, conv_size - 1) short-conv inputs
    memory: TitansState   # chunk-start weights, current weights, momentum, position in chunk


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


@register
class Titans(TokenMixer):
    name = "titans"
    Config = TitansConfig
    test_space = {
        "n_heads": [1, 2],
        "depth": [1, 3],
        "expansion": [2],
        "chunk_size": [1, 3, 8],
        "read": ["token", "chunk_start"],
        "residual": [False, True],
    }

    def __init__(self, config: TitansConfig, *, d_model: int, layer_idx: int = 0) -> None:
        super().__init__(config, d_model=d_model, layer_idx=layer_idx)
        h = self.n_heads = config.n_heads
        k = self.head_dim = d_model // h
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.conv = ShortConv(3 * d_model, kernel_size=config.conv_size) if config.conv else None
        self.gates = nn.Linear(d_model, 3 * h)  # theta, eta, alpha per head
        with torch.no_grad():
            self.gates.weight.mul_(0.1)  # start near the initial gate values below
            init = (config.init_lr, config.init_momentum, config.init_forget)
            self.gates.bias.copy_(torch.tensor([_logit(p) for p in init]).repeat_interleave(h))
        dims = [k] + [k * config.expansion] * (config.memory_depth - 1) + [k]
        # Learnable initial memory weights M_0 per head (the outer loop learns them).
        self.memory = nn.ParameterList(
            nn.Parameter(torch.randn(h, dims[i], dims[i + 1]) / math.sqrt(dims[i]))
            for i in range(config.memory_depth))
        self.gate_proj = nn.Linear(d_model, d_model, bias=False)
        self.norm = GatedRMSNorm(k)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> TitansMixerState:
        weights = tuple(repeat(w.to(device=device, dtype=dtype), "h i o -> b h i o", b=batch_size)  # (B, H, d_in, d_out)
                        for w in self.memory)
        memory = TitansState(weights, weights, tuple(torch.zeros_like(w) for w in weights), 0)
        conv = (self.conv.init_state(batch_size, device=device, dtype=dtype) if self.conv is not None
                else torch.zeros(batch_size, 3 * self.d_model, 0, device=device, dtype=dtype))
        return TitansMixerState(conv, memory)

    def _gates(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c = self.config
        theta, eta, alpha = rearrange(torch.sigmoid(self.gates(x)), "b t (g h) -> g b t h", g=3)  # (B, T, H)
        theta = c.max_lr * theta
        eta = c.max_momentum * eta if c.momentum else torch.zeros_like(eta).detach()
        alpha = c.max_forget * alpha if c.forgetting else torch.zeros_like(alpha).detach()
        return theta, eta, alpha

    def forward(self, x: Tensor, state: TitansMixerState | None = None) -> tuple[Tensor, TitansMixerState]:
        state = state if state is not None else self.default_state(x)
        qkv = self.qkv(x)
        if self.conv is not None:
            qkv, conv_state = self.conv(qkv, state.conv)
        else:
            qkv, conv_state = F.silu(qkv), state.conv
        q, k, v = rearrange(qkv, "b t (g h d) -> g b t h d", g=3, h=self.n_heads)  # (B, T, H, K)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        theta, eta, alpha = self._gates(x)
        o, memory = titans_memory(q, k, v, theta, eta, alpha, None, chunk_size=self.config.chunk_size,
                                  activation=self.config.activation, read=self.config.read,
                                  initial_state=state.memory, output_final_state=True,
                                  residual=self.config.residual)
        gate = rearrange(self.gate_proj(x), "b t (h d) -> b t h d", h=self.n_heads)  # (B, T, H, V)
        y = rearrange(self.norm(o, gate), "b t h d -> b t (h d)")  # (B, T, D)
        return self.out(y), TitansMixerState(conv_state, memory)

    def step(self, x: Tensor, state: TitansMixerState) -> tuple[Tensor, TitansMixerState]:
        y, state = self.forward(x[:, None], state)
        return y[:, 0], state
