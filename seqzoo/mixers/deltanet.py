"""DeltaNet (Schlag et al. 2021, "Linear Transformers Are Secretly Fast Weight Programmers";
Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence
Length"): linear attention whose fast-weight state is updated by the delta rule

    S_t = (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ,      o_t = S_tᵀ q_t / √K,

with the parameterisation of Yang et al. 2024 (section 3.3 / their released layer):
q, k, v from linear projections, each through a short causal depthwise conv + SiLU;
q, k L2-normalised per head, as x / sqrt(||x||² + 1e-6) like their release (which keeps
I − β kkᵀ a contraction for β ∈ (0, 2));
β_t = σ(x_t w_β) per head, or 2σ(x_t w_β) ∈ (0, 2) with ``allow_neg_eigval`` (negative
eigenvalues, Grazzi et al. 2024, "Unlocking State-Tracking in Linear RNNs Through Negative
Eigenvalues"); per-head RMSNorm on the output (optionally gated by SiLU(x W_g)), then the
output projection. ``forward`` runs the chunked WY/UT form, ``step`` the recurrence.

Backends: "fla" (flash-linear-attention's chunked gated-delta-rule kernel, decay 0 for
DeltaNet) and "fla+causal_conv1d" (also the short convolutions on causal-conv1d's kernel);
states pass through both, so chaining and decoding continue a kernel forward exactly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import Field
from torch import Tensor, nn

from seqzoo.layers.norms import GatedRMSNorm, RMSNorm, l2_normalize
from seqzoo.kernels import parts
from seqzoo.layers.short_conv import ShortConv
from seqzoo.limits import MAX_EXPANSION
from seqzoo.mixers.base import ConfigError, MixerConfig, TokenMixer, register
from seqzoo.ops.delta_rule import chunk_delta_rule, delta_rule_step


class DeltaRuleConfig(MixerConfig):
    """Hyper-parameters shared by DeltaNet and Gated DeltaNet."""

    n_heads: int = Field(4, ge=1)
    head_dim: int | None = Field(None, ge=1, description="key dim K per head (None: d_model // n_heads)")
    expand_v: float = Field(1.0, gt=0, le=MAX_EXPANSION, description="value dim per head V = expand_v * K")
    chunk_size: int = Field(64, ge=1, description="chunk length C of the WY/UT form")
    use_short_conv: bool = True
    conv_size: int = Field(4, ge=2)
    allow_neg_eigval: bool = Field(False, description="β ∈ (0, 2) instead of (0, 1)")
    norm_eps: float = Field(1e-5, gt=0)
    use_gate: bool = Field(False, description="gate the normalised output with SiLU(x W_g)")

    def head_dims(self, d_model: int) -> tuple[int, int]:
        dk = self.head_dim if self.head_dim is not None else d_model // self.n_heads
        return dk, int(round(dk * self.expand_v))

    def check(self, d_model: int) -> None:
        if self.head_dim is None:
            self.require_divisible("n_heads", self.n_heads, d_model)
        dk, dv = self.head_dims(d_model)
        if dv < 1 or abs(dk * self.expand_v - dv) > 1e-6:
            raise ConfigError("expand_v", f"head_dim * expand_v = {dk} * {self.expand_v} must be a positive integer")


class DeltaNetConfig(DeltaRuleConfig):
    """DeltaNet's hyper-parameters (the shared ones, with DeltaNet's defaults)."""


class DeltaNetState(NamedTuple):
    conv_q: Tensor  # (B, H*K, conv_size - 1) last inputs of the q short conv
    conv_k: Tensor  # (B, H*K, conv_size - 1)
    conv_v: Tensor  # (B, H*V, conv_size - 1)
    memory: Tensor  # (B, H, K, V) the fast-weight matrix S


@register
class DeltaNet(TokenMixer):
    name = "deltanet"
    Config = DeltaNetConfig
    backends = ("fla+causal_conv1d", "fla")
    test_space = {"n_heads": [1, 2, 4], "chunk_size": [1, 3, 8], "allow_neg_eigval": [False, True],
                  "use_gate": [False, True]}

    def __init__(self, config: DeltaRuleConfig, *, d_model: int, layer_idx: int = 0) -> None:
        super().__init__(config, d_model=d_model, layer_idx=layer_idx)
        self.n_heads = config.n_heads
        self.head_k, self.head_v = config.head_dims(d_model)
        key_dim, value_dim = self.n_heads * self.head_k, self.n_heads * self.head_v
        self.q_proj = nn.Linear(d_model, key_dim, bias=False)
        self.k_proj = nn.Linear(d_model, key_dim, bias=False)
        self.v_proj = nn.Linear(d_model, value_dim, bias=False)
        self.b_proj = nn.Linear(d_model, self.n_heads, bias=False)
        if config.use_short_conv:
            self.q_conv = ShortConv(key_dim, kernel_size=config.conv_size)
            self.k_conv = ShortConv(key_dim, kernel_size=config.conv_size)
            self.v_conv = ShortConv(value_dim, kernel_size=config.conv_size)
        if config.use_gate:
            self.g_proj = nn.Linear(d_model, value_dim, bias=False)
            self.o_norm: nn.Module = GatedRMSNorm(self.head_v, eps=config.norm_eps)
        else:
            self.o_norm = RMSNorm(self.head_v, eps=config.norm_eps)
        self.o_proj = nn.Linear(value_dim, d_model, bias=False)

    # -- state ------------------------------------------------------------------------
    def init_state(self, batch_size: int, *, device=None, dtype=None) -> DeltaNetState:
        taps = self.config.conv_size - 1 if self.config.use_short_conv else 0
        key_dim, value_dim = self.n_heads * self.head_k, self.n_heads * self.head_v
        zeros = lambda dim: torch.zeros(batch_size, dim, taps, device=device, dtype=dtype)  # noqa: E731
        # The fast-weight memory accumulates over the whole sequence: fp32 under half precision.
        mem_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        memory = torch.zeros(batch_size, self.n_heads, self.head_k, self.head_v, device=device, dtype=mem_dtype)
        return DeltaNetState(zeros(key_dim), zeros(key_dim), zeros(value_dim), memory)

    def kernel_limits(self, backend: str) -> str | None:
        from seqzoo.kernels.causal_conv1d import conv_limits

        if "fla" in parts(backend) and self.head_k > 256:
            return f"fla's delta-rule kernel takes head dims K <= 256, got {self.head_k}"
        return conv_limits(backend, width=self.config.conv_size if self.config.use_short_conv else None)

    # -- pieces shared by forward and step (x: (B, T, D)) ---------------------------------
    def _qkv(self, x: Tensor, state: DeltaNetState, *,
             conv_kernel: bool = False) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, ...]]:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.config.use_short_conv:
            q, cq = self.q_conv(q, state.conv_q, kernel=conv_kernel)
            k, ck = self.k_conv(k, state.conv_k, kernel=conv_kernel)
            v, cv = self.v_conv(v, state.conv_v, kernel=conv_kernel)
            convs = (cq, ck, cv)
        else:
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
            convs = (state.conv_q, state.conv_k, state.conv_v)
        q = rearrange(q, "b t (h k) -> b t h k", h=self.n_heads)  # (B, T, H, K)
        k = rearrange(k, "b t (h k) -> b t h k", h=self.n_heads)  # (B, T, H, K)
        v = rearrange(v, "b t (h v) -> b t h v", h=self.n_heads)  # (B, T, H, V)
        return l2_normalize(q), l2_normalize(k), v, convs

    def _beta(self, x: Tensor) -> Tensor:
        beta = torch.sigmoid(self.b_proj(x))  # (B, T, H)
        return 2 * beta if self.config.allow_neg_eigval else beta

    def _log_decay(self, x: Tensor) -> Tensor | None:
        """log α_t per head, (B, T, H); DeltaNet has no decay."""
        return None

    def _output(self, o: Tensor, x: Tensor) -> Tensor:
        """o: (B, T, H, V) -> (B, T, D): per-head RMSNorm (gated by SiLU(x W_g)), out-projection."""
        if self.config.use_gate:
            gate = rearrange(self.g_proj(x), "b t (h v) -> b t h v", h=self.n_heads)  # (B, T, H, V)
            o = self.o_norm(o, gate)
        else:
            o = self.o_norm(o)
        return self.o_proj(rearrange(o, "b t h v -> b t (h v)"))

    # -- the contract -------------------------------------------------------------------
    def forward(self, x: Tensor, state: DeltaNetState | None = None) -> tuple[Tensor, DeltaNetState]:
        state = state if state is not None else self.default_state(x)
        kernels = parts(self.backend)
        q, k, v, convs = self._qkv(x, state, conv_kernel="causal_conv1d" in kernels)
        if "fla" in kernels:
            from seqzoo.kernels.fla_delta import fla_delta_rule

            o, memory = fla_delta_rule(q, k, v, self._beta(x), self._log_decay(x), initial_state=state.memory,
                                       output_final_state=True)
        else:
            o, memory = chunk_delta_rule(q, k, v, self._beta(x), self._log_decay(x),
                                         chunk_size=self.config.chunk_size, initial_state=state.memory,
                                         output_final_state=True)
        return self._output(o, x), DeltaNetState(*convs, memory)

    def step(self, x: Tensor, state: DeltaNetState) -> tuple[Tensor, DeltaNetState]:
        x = x[:, None]  # (B, 1, D): projections and convs see a length-1 sequence
        q, k, v, convs = self._qkv(x, state)
        g = self._log_decay(x)
        o, memory = delta_rule_step(q[:, 0], k[:, 0], v[:, 0], self._beta(x)[:, 0], state.memory,
                                    g=None if g is None else g[:, 0])
        return self._output(o[:, None], x)[:, 0], DeltaNetState(*convs, memory)
