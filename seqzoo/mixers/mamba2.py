"""Mamba2 (Dao & Gu 2024, "Transformers are SSMs: Generalized Models and Efficient
Algorithms Through Structured State Space Duality", section 7 "the Mamba-2 block").

One input projection produces, in mamba-ssm's order, (z, x, B, C, dt) from the token:
x, B, C go through a short causal depthwise conv (kernel 4, bias) + SiLU; then per head h
(head dim P, E·D/P heads, B and C shared by groups of heads)

    dt_t = softplus(dt_raw_t + dt_bias_h),  A_h = -exp(A_log_h)
    h_t  = exp(dt_t A_h) h_{t-1} + dt_t x_t B_tᵀ,   y_t = h_t C_t + D_h x_t      (SSD, ops/ssd.py)

With ``allow_neg_eigval`` the transition exp(dt_t A_h) is 2·exp(dt_t A_h) − 1 ∈ (−1, 1]
(negative eigenvalues, Grazzi et al. 2024, "Unlocking State-Tracking in Linear RNNs
Through Negative Eigenvalues"); the input term dt_t x_t B_tᵀ is unchanged. The chunked
form then multiplies the transitions instead of summing log-decays, exact for negative
and zero ones (``seqzoo.ops.ssd``); no kernel computes it, so ``auto`` picks the reference
and a kernel asked for by name is refused.
The output is out_proj(RMSNorm_grouped(y ⊙ SiLU(z))) (mamba-ssm's RMSNormGated with
``norm_before_gate=False``, one RMS per group of E·D/G channels). Initialisation as the
paper's code: dt_bias = softplus⁻¹(dt), dt log-uniform on [dt_min, dt_max] floored at
dt_init_floor; A_log = log(U(1, 16)); D = 1; norm weight 1.
Decode state: the conv window over (x, B, C) and the SSM state (B, H, P, N).
Backends (CUDA; fla also on CPU under Triton's interpreter, for the tests): "mamba_ssm"
(mamba-ssm's chunked SSD kernel), "fla" (SSD as scalar-gated linear attention on fla's
simple-GLA kernel), each also "+causal_conv1d" for the short conv; states in and out.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Annotated, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import Field, model_validator
from torch import Tensor, nn

from seqzoo.kernels import parts
from seqzoo.layers.short_conv import ShortConv
from seqzoo.mixers.base import ConfigError, MixerConfig, TokenMixer, register
from seqzoo.ops.ssd import ssd, ssd_step


class Mamba2Config(MixerConfig):
    d_state: int = Field(128, ge=1, description="N, SSM state size per head")
    d_conv: int = Field(4, ge=1, description="short conv kernel size")
    expand: int = Field(2, ge=1, description="E, inner width E·D")
    headdim: int | None = Field(None, ge=1, description="P; None = 64 (mamba-ssm) or E·D if smaller")
    n_groups: int = Field(1, ge=1, description="G, groups of heads sharing B, C and one norm group")
    chunk_size: int = Field(64, ge=1, description="SSD chunk length C (CPU-friendly default)")
    dt_min: float = Field(0.001, gt=0)
    dt_max: float = Field(0.1, gt=0)
    dt_init_floor: float = Field(1e-4, gt=0)
    dt_limit: tuple[float, Annotated[float, Field(allow_inf_nan=True)]] = Field((0.0, math.inf), strict=False, description="clamp of dt after softplus")
    A_init_range: tuple[float, float] = Field((1.0, 16.0), strict=False, description="A_log = log U(lo, hi)")
    skip_per_channel: bool = Field(False, description="D per channel (mamba-ssm's D_has_hdim)")
    conv_bias: bool = True
    bias: bool = Field(False, description="biases of in_proj / out_proj")
    norm_eps: float = Field(1e-5, gt=0)
    allow_neg_eigval: bool = Field(False, description="transition 2·exp(ΔA) − 1 ∈ (−1, 1] instead of "
                                                      "exp(ΔA) ∈ (0, 1]")

    @model_validator(mode="after")
    def _ranges(self) -> "Mamba2Config":
        if self.dt_min > self.dt_max:
            raise ValueError(f"dt_min={self.dt_min} must be <= dt_max={self.dt_max}")
        lo, hi = self.A_init_range
        if not 0 < lo <= hi:
            raise ValueError(f"A_init_range: expected 0 < lo <= hi, got {self.A_init_range}")
        if not 0 <= self.dt_limit[0] < self.dt_limit[1]:
            raise ValueError(f"dt_limit: expected 0 <= lo < hi, got {self.dt_limit}")
        return self

    def resolved_headdim(self, d_model: int) -> int:
        return self.headdim if self.headdim is not None else min(64, self.expand * d_model)

    def check(self, d_model: int) -> None:
        d_inner = self.expand * d_model
        p = self.resolved_headdim(d_model)
        if d_inner % p:
            raise ConfigError("headdim", f"must divide the inner width expand*d_model={d_inner}, got {p}")
        n_heads = d_inner // p
        if n_heads % self.n_groups:
            raise ConfigError("n_groups", f"must divide the number of heads {n_heads} (= {d_inner}/{p}), "
                                          f"got {self.n_groups}")


class Mamba2State(NamedTuple):
    conv: Tensor  # (B, E·D + 2·G·N, d_conv - 1) last inputs of the short conv over (x, B, C)
    ssm: Tensor   # (B, H, P, N)


class GroupedGatedRMSNorm(nn.Module):
    """RMSNorm(y ⊙ SiLU(z)) with one RMS per group of ``dim / groups`` channels and a
    per-channel weight: mamba-ssm's ``RMSNormGated(norm_before_gate=False, group_size)``.
    Computed in at least fp32."""

    def __init__(self, dim: int, *, groups: int, eps: float) -> None:
        super().__init__()
        self.groups = groups
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        dtype = y.dtype
        cdt = torch.promote_types(dtype, torch.float32)
        v = rearrange(y.to(cdt) * F.silu(z.to(cdt)), "... (g c) -> ... g c", g=self.groups)  # (..., G, E·D/G)
        v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + self.eps)
        return (rearrange(v, "... g c -> ... (g c)") * self.weight.to(cdt)).to(dtype)  # (..., E·D)


@register
class Mamba2(TokenMixer):
    name = "mamba2"
    Config = Mamba2Config
    backends = ("mamba_ssm+causal_conv1d", "mamba_ssm", "fla+causal_conv1d", "fla")
    test_space = {"headdim": [4, 8, 16], "n_groups": [1, 2], "d_state": [4, 8], "chunk_size": [1, 3, 8],
                  "allow_neg_eigval": [False, True]}

    def __init__(self, config: Mamba2Config, *, d_model: int, layer_idx: int = 0) -> None:
        super().__init__(config, d_model=d_model, layer_idx=layer_idx)
        self.d_inner = config.expand * d_model
        self.headdim = config.resolved_headdim(d_model)
        self.n_heads = self.d_inner // self.headdim
        self.n_groups = config.n_groups
        self.d_state = config.d_state
        self.conv_dim = self.d_inner + 2 * config.n_groups * config.d_state
        # Order of the projection's outputs, as mamba-ssm: [z, x, B, C, dt].
        self.in_proj = nn.Linear(d_model, self.d_inner + self.conv_dim + self.n_heads, bias=config.bias)
        self.conv = ShortConv(self.conv_dim, kernel_size=config.d_conv, activation="silu", bias=config.conv_bias)

        # dt log-uniform on [dt_min, dt_max], floored; dt_bias = softplus⁻¹(dt) = dt + log(1 - e^{-dt}).
        log_lo, log_hi = math.log(config.dt_min), math.log(config.dt_max)
        dt = torch.exp(torch.rand(self.n_heads) * (log_hi - log_lo) + log_lo).clamp(min=config.dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.empty(self.n_heads).uniform_(*config.A_init_range)))
        self.D = nn.Parameter(torch.ones(self.d_inner if config.skip_per_channel else self.n_heads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True  # as mamba-ssm: no weight decay on the SSM parameters

        self.norm = GroupedGatedRMSNorm(self.d_inner, groups=config.n_groups, eps=config.norm_eps)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=config.bias)

    def kernel_limits(self, backend: str) -> str | None:
        from seqzoo.kernels.causal_conv1d import conv_limits

        if set(parts(backend)) & {"fla", "mamba_ssm"} and self.config.allow_neg_eigval:
            return "the SSD kernels compute the transition exp(ΔA) only (no negative eigenvalues)"
        return conv_limits(backend, width=self.config.d_conv)

    def _ssd(self, backend: str):
        """The SSD form ``backend`` runs: the reference chunked form or a kernel binding."""
        kernels = parts(backend)
        if "mamba_ssm" in kernels:
            from seqzoo.kernels.mamba_ssm import ssd_mamba_ssm

            return ssd_mamba_ssm
        if "fla" in kernels:
            from seqzoo.kernels.fla_ssd import fla_ssd

            return fla_ssd
        return partial(ssd, chunk_size=self.config.chunk_size, allow_neg_eigval=self.config.allow_neg_eigval)

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> Mamba2State:
        return Mamba2State(
            conv=self.conv.init_state(batch_size, device=device, dtype=dtype),
            ssm=torch.zeros(batch_size, self.n_heads, self.headdim, self.d_state, device=device, dtype=dtype),
        )

    # -- pieces shared by forward and step --------------------------------------------------
    def _split_proj(self, zxbcdt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.n_heads], dim=-1)

    def _ssm_params(self, dt_raw: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        cdt = torch.promote_types(dt_raw.dtype, torch.float32)  # exp/softplus in >= fp32, as mamba-ssm
        dt = F.softplus(dt_raw.to(cdt) + self.dt_bias.to(cdt))
        lo, hi = self.config.dt_limit
        if (lo, hi) != (0.0, math.inf):
            dt = dt.clamp(min=lo, max=hi)
        A = -torch.exp(self.A_log.to(cdt))  # (H,)
        D = self.D.to(cdt)
        if self.config.skip_per_channel:
            D = rearrange(D, "(h p) -> h p", p=self.headdim)  # (H, P)
        return dt, A, D

    def _split_xbc(self, xbc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        gn = self.n_groups * self.d_state
        return torch.split(xbc, [self.d_inner, gn, gn], dim=-1)

    def _output(self, y: Tensor, z: Tensor) -> Tensor:
        return self.out_proj(self.norm(y, z))

    # -- the contract ---------------------------------------------------------------------
    def forward(self, x: Tensor, state: Mamba2State | None = None) -> tuple[Tensor, Mamba2State]:
        state = state if state is not None else self.default_state(x)
        backend = self.backend
        z, xbc, dt_raw = self._split_proj(self.in_proj(x))
        xbc, conv_state = self.conv(xbc, state.conv, kernel="causal_conv1d" in parts(backend))
        xs, B, C = self._split_xbc(xbc)
        dt, A, D = self._ssm_params(dt_raw)
        y, ssm_state = self._ssd(backend)(
            rearrange(xs, "b t (h p) -> b t h p", p=self.headdim),  # (B, T, H, P)
            dt, A,
            rearrange(B, "b t (g n) -> b t g n", g=self.n_groups),  # (B, T, G, N)
            rearrange(C, "b t (g n) -> b t g n", g=self.n_groups),  # (B, T, G, N)
            D=D, initial_state=state.ssm, output_final_state=True,
        )
        y = rearrange(y, "b t h p -> b t (h p)")  # (B, T, E·D)
        return self._output(y, z), Mamba2State(conv_state, ssm_state.to(state.ssm.dtype))

    def step(self, x: Tensor, state: Mamba2State) -> tuple[Tensor, Mamba2State]:
        z, xbc, dt_raw = self._split_proj(self.in_proj(x))
        xbc, conv_state = self.conv.step(xbc, state.conv)
        xs, B, C = self._split_xbc(xbc)
        dt, A, D = self._ssm_params(dt_raw)
        y, ssm_state = ssd_step(
            rearrange(xs, "b (h p) -> b h p", p=self.headdim),  # (B, H, P)
            dt, A,
            rearrange(B, "b (g n) -> b g n", g=self.n_groups),  # (B, G, N)
            rearrange(C, "b (g n) -> b g n", g=self.n_groups),  # (B, G, N)
            state.ssm, D=D, allow_neg_eigval=self.config.allow_neg_eigval,
        )
        y = rearrange(y, "b h p -> b (h p)")  # (B, E·D)
        return self._output(y, z), Mamba2State(conv_state, ssm_state.to(state.ssm.dtype))
