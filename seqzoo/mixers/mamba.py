"""Mamba (S6) mixer (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective
State Spaces", sec. 3 and fig. 3), parameterised and initialised like mamba-ssm's ``Mamba``
so that its checkpoints load one to one (``seqzoo.interop.mamba``):

    x, z = in_proj(u)                        expand E: D -> 2 E D
    x    = SiLU(causal depthwise conv(x))    kernel 4, with bias
    Δ, B, C = x_proj(x)                      Δ low rank R = ceil(D / 16); B, C ∈ R^N
    Δ    = softplus(dt_proj(Δ) + b_Δ)        b_Δ = softplus⁻¹(dt), dt log-uniform in [dt_min, dt_max]
    y    = selective_scan(x, Δ, A = -exp(A_log), B, C, D) ⊙ SiLU(z)
    out  = out_proj(y)

Initialisation (sec. 3.6 and appendix): A_log = log(1..N) per channel (S4D-real), D = 1,
dt_proj.weight uniform in ±R^-0.5 · dt_scale, dt floored at ``dt_init_floor``.
With ``allow_neg_eigval`` the transition exp(ΔA) of every channel and state is
2·exp(ΔA) − 1 ∈ (−1, 1] (negative eigenvalues, Grazzi et al. 2024, "Unlocking
State-Tracking in Linear RNNs Through Negative Eigenvalues"; the input term Δ·B·x is
unchanged). The chunked closed form cannot represent it, so every ``scan`` then runs the
sequential form (``seqzoo.ops.selective_scan``); mamba-ssm's kernel cannot either, so
``auto`` picks the reference and "mamba_ssm" asked for by name is refused.
Decode state: the last ``d_conv - 1`` conv inputs and the SSM state h: (B, E·D, N).
Backends: "reference" (``scan``: the chunked or the sequential pure-PyTorch scan, "auto"
picks the chunked form except for very short calls, see ``seqzoo.ops.selective_scan``), "mamba_ssm" (its fused CUDA
selective-scan kernel, initial state included; ``seqzoo.kernels.mamba_ssm``) and "mamba_ssm+causal_conv1d" (the
short conv on causal-conv1d's kernel too); CUDA only.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import Field
from torch import Tensor, nn

from seqzoo.kernels import parts
from seqzoo.layers.short_conv import ShortConv
from seqzoo.limits import MAX_EXPANSION
from seqzoo.mixers.base import ConfigError, MixerConfig, TokenMixer, register
from seqzoo.ops.selective_scan import selective_scan
from seqzoo.ops.transition import transition


class MambaConfig(MixerConfig):
    d_state: int = Field(16, ge=1, description="SSM state size N per channel")
    d_conv: int = Field(4, ge=1, description="kernel of the causal depthwise conv")
    expand: float = Field(2, gt=0, le=MAX_EXPANSION, description="inner width E·D = int(expand * d_model)")
    dt_rank: int | Literal["auto"] = Field("auto", description="rank R of Δ's projection; auto = ceil(D/16)")
    dt_min: float = Field(0.001, gt=0)
    dt_max: float = Field(0.1, gt=0)
    dt_init: Literal["random", "constant"] = "random"
    dt_scale: float = Field(1.0, gt=0)
    dt_init_floor: float = Field(1e-4, gt=0)
    conv_bias: bool = True
    bias: bool = Field(False, description="biases on in_proj / out_proj")
    scan: Literal["auto", "chunked", "sequential"] = Field(
        "auto", description="reference form of the scan; auto = chunked (closed form) unless T < 24")
    chunk_size: int | None = Field(None, ge=1, description="longest chunk of the chunked scan (a decay budget "
                                                          "may cut chunks shorter); None = automatic")
    allow_neg_eigval: bool = Field(False, description="transition 2·exp(ΔA) − 1 ∈ (−1, 1] instead of "
                                                      "exp(ΔA) ∈ (0, 1]; scans sequentially")

    def check(self, d_model: int) -> None:
        if int(self.expand * d_model) < 1:
            raise ConfigError("expand", f"expand * d_model = {self.expand * d_model} leaves no channels")
        if self.dt_rank != "auto" and self.dt_rank < 1:
            raise ConfigError("dt_rank", f"expected 'auto' or a positive int, got {self.dt_rank}")
        if self.dt_min > self.dt_max:
            raise ConfigError("dt_min", f"dt_min={self.dt_min} exceeds dt_max={self.dt_max}")

    def inner(self, d_model: int) -> int:
        return int(self.expand * d_model)

    def rank(self, d_model: int) -> int:
        return math.ceil(d_model / 16) if self.dt_rank == "auto" else self.dt_rank


class MambaState(NamedTuple):
    conv: Tensor  # (B, E·D, d_conv - 1) last inputs of the short conv, oldest first
    ssm: Tensor   # (B, E·D, N) the selective SSM's state h


def _dt_bias(n: int, *, dt_min: float, dt_max: float, floor: float) -> Tensor:
    """b_Δ with softplus(b_Δ) = dt, dt log-uniform in [dt_min, dt_max] and >= floor."""
    log_dt = torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    dt = log_dt.exp().clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))  # softplus⁻¹(dt) = log(exp(dt) - 1), stably


@register
class Mamba(TokenMixer):
    name = "mamba"
    Config = MambaConfig
    backends = ("mamba_ssm+causal_conv1d", "mamba_ssm")
    test_space = {"d_state": [1, 4], "expand": [1, 2], "d_conv": [2, 4],
                  "scan": ["auto", "chunked", "sequential"], "chunk_size": [None, 3, 8],
                  "allow_neg_eigval": [False, True]}

    def __init__(self, config: MambaConfig, *, d_model: int, layer_idx: int = 0) -> None:
        super().__init__(config, d_model=d_model, layer_idx=layer_idx)
        self.d_inner = d_inner = config.inner(d_model)
        self.dt_rank = rank = config.rank(d_model)
        self.d_state = n = config.d_state
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=config.bias)
        self.conv1d = ShortConv(d_inner, kernel_size=config.d_conv, activation="silu", bias=config.conv_bias)
        self.x_proj = nn.Linear(d_inner, rank + 2 * n, bias=False)
        self.dt_proj = nn.Linear(rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=config.bias)
        # Neither A_log nor D should be decayed by AdamW (mamba-ssm marks them the same way).
        self.A_log._no_weight_decay = True  # type: ignore[attr-defined]
        self.D._no_weight_decay = True  # type: ignore[attr-defined]
        self.reset_dt_parameters()

    @torch.no_grad()
    def reset_dt_parameters(self) -> None:
        """Δ's projection initialised so that Δ starts inside [dt_min, dt_max] (paper sec. 3.6)."""
        c = self.config
        std = self.dt_rank ** -0.5 * c.dt_scale
        if c.dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, std)
        else:
            nn.init.uniform_(self.dt_proj.weight, -std, std)
        bias = _dt_bias(self.d_inner, dt_min=c.dt_min, dt_max=c.dt_max, floor=c.dt_init_floor)
        self.dt_proj.bias.copy_(bias)

    def kernel_limits(self, backend: str) -> str | None:
        from seqzoo.kernels.causal_conv1d import conv_limits

        if "mamba_ssm" in parts(backend) and self.config.allow_neg_eigval:
            return "mamba_ssm's scan computes the transition exp(ΔA) only (no negative eigenvalues)"
        return conv_limits(backend, width=self.config.d_conv)

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> MambaState:
        ssm_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        return MambaState(
            self.conv1d.init_state(batch_size, device=device, dtype=dtype),
            torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=ssm_dtype),
        )

    def _ssm_inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: (..., E·D) -> Δ before its bias and softplus (..., E·D), B and C (..., N)."""
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.linear(dt, self.dt_proj.weight), B, C  # bias enters inside the scan

    def forward(self, x: Tensor, state: MambaState | None = None) -> tuple[Tensor, MambaState]:
        kernels = parts(self.backend)
        method = "mamba_ssm" if "mamba_ssm" in kernels else self.config.scan
        fresh = state is None
        state = state if state is not None else self.default_state(x)
        xi, z = self.in_proj(x).chunk(2, dim=-1)  # (B, T, E·D) each
        xi, conv_state = self.conv1d(xi, state.conv, kernel="causal_conv1d" in kernels)
        dt, B, C = self._ssm_inputs(xi)
        y, ssm_state = selective_scan(
            rearrange(xi, "b t d -> b d t"), rearrange(dt, "b t d -> b d t"),  # (B, E·D, T)
            -torch.exp(self.A_log), rearrange(B, "b t n -> b n t"), rearrange(C, "b t n -> b n t"),  # (B, N, T)
            D=self.D, z=rearrange(z, "b t d -> b d t"), delta_bias=self.dt_proj.bias,
            delta_softplus=True, initial_state=None if fresh else state.ssm, return_final_state=True,
            method=method, chunk_size=self.config.chunk_size, allow_neg_eigval=self.config.allow_neg_eigval,
        )
        out = self.out_proj(rearrange(y, "b d t -> b t d"))  # (B, T, D)
        return out, MambaState(conv_state, ssm_state)

    def step(self, x: Tensor, state: MambaState) -> tuple[Tensor, MambaState]:
        """One token of the recurrence (paper Algorithm 2), written out."""
        xi, z = self.in_proj(x).chunk(2, dim=-1)  # (B, E·D) each
        xi, conv_state = self.conv1d.step(xi, state.conv)
        dt, B, C = self._ssm_inputs(xi)
        h = state.ssm
        delta = F.softplus(dt + self.dt_proj.bias).to(h.dtype)  # (B, E·D)
        A = -torch.exp(self.A_log).to(h.dtype)  # (E·D, N)
        decay = transition(delta[:, :, None] * A, self.config.allow_neg_eigval)  # (B, E·D, N)
        h = decay * h + (delta * xi.to(h.dtype))[:, :, None] * B.to(h.dtype)[:, None, :]
        y = (h * C.to(h.dtype)[:, None, :]).sum(-1) + self.D * xi  # (B, E·D)
        y = (y * F.silu(z)).to(x.dtype)
        return self.out_proj(y), MambaState(conv_state, h)
