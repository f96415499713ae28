"""Gated DeltaNet (Yang, Kautz & Hatamizadeh 2024, "Gated Delta Networks: Improving Mamba2
with Delta Rule", ICLR 2025): the delta rule with Mamba2's data-dependent scalar decay,

    S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ,      o_t = S_tᵀ q_t / √K,
    α_t = exp(−exp(A_log) · softplus(x_t w_a + dt_bias))   per head,

initialised as in the authors' release (Mamba2-style): A = exp(A_log) ~ U(0, 16) and
softplus(dt_bias) = Δ ~ logU(0.001, 0.1) (floored at 1e-4). Everything else is DeltaNet's
parameterisation (short conv + SiLU on q, k, v, L2-normalised q, k, β = σ(x w_β) or
β ∈ (0, 2) with ``allow_neg_eigval``), with the paper's output block: per-head RMSNorm
gated by SiLU(x W_g), then the output projection; the value dim is 2× the key dim by default.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from seqzoo.mixers.deltanet import DeltaNet, DeltaRuleConfig
from seqzoo.limits import MAX_EXPANSION
from seqzoo.mixers.base import ConfigError, register


class GatedDeltaNetConfig(DeltaRuleConfig):
    expand_v: float = Field(2.0, gt=0, le=MAX_EXPANSION, description="value dim per head V = expand_v * K")
    use_gate: bool = Field(True, description="gate the normalised output with SiLU(x W_g)")
    a_init_range: tuple[float, float] = Field((0.0, 16.0), strict=False, description="A = exp(A_log) ~ U(lo, hi)")
    dt_min: float = Field(0.001, gt=0)
    dt_max: float = Field(0.1, gt=0)

    def check(self, d_model: int) -> None:
        super().check(d_model)
        lo, hi = self.a_init_range
        if not 0 <= lo < hi:
            raise ConfigError("a_init_range", f"expected 0 <= lo < hi, got {self.a_init_range}")
        if self.dt_min > self.dt_max:
            raise ConfigError("dt_min", f"dt_min={self.dt_min} exceeds dt_max={self.dt_max}")


@register
class GatedDeltaNet(DeltaNet):
    name = "gated_deltanet"
    Config = GatedDeltaNetConfig
    test_space = {"n_heads": [1, 2, 4], "chunk_size": [1, 3, 8], "allow_neg_eigval": [False, True],
                  "expand_v": [1.0, 2.0]}

    def __init__(self, config: GatedDeltaNetConfig, *, d_model: int, layer_idx: int = 0) -> None:
        super().__init__(config, d_model=d_model, layer_idx=layer_idx)
        h = self.n_heads
        self.a_proj = nn.Linear(d_model, h, bias=False)
        lo, hi = config.a_init_range
        self.A_log = nn.Parameter(torch.empty(h).uniform_(lo, hi).log())
        # Δ log-uniform in [dt_min, dt_max]; dt_bias is its inverse softplus (as Mamba2).
        dt = torch.exp(torch.rand(h) * (math.log(config.dt_max) - math.log(config.dt_min)) + math.log(config.dt_min))
        dt = dt.clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log._no_weight_decay = True  # type: ignore[attr-defined]
        self.dt_bias._no_weight_decay = True  # type: ignore[attr-defined]

    def _log_decay(self, x: Tensor) -> Tensor:
        """g_t = log α_t = −exp(A_log) · softplus(x w_a + dt_bias), (B, T, H)."""
        return -self.A_log.exp() * F.softplus(self.a_proj(x) + self.dt_bias)
