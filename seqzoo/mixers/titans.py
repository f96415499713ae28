"""Titans neural long-term memory (LMM) as a token mixer (Behrouz, Zhong & Mirrokni 2024,
"Titans: Learning to Memorize at Test Time", section 3 and section 4.4 "Architectural
Details"; DESIGN.md 5.9).

Per head: q, k = SiLU(short-conv(x W_{q,k})), L2-normalised (the paper, section 4.4); the
value path is the paper's SiLU(short-conv(x W_v)) or a plain projection x W_v
(``value_path``). A memory MLP (depth 1-4, hidden = expansion * K, learnable initial weights
M_0 per head, optionally with a bias per layer, an outer LayerNorm and a residual as TTT's
inner model) is trained at test time on ||M(k_t) - v_t||^2 with momentum and forgetting
(eq. 13-14; chunked gradients eq. 16-18, see ``seqzoo.ops.titans``); read-out y_t = M_t(q_t);
output RMSNorm and SiLU(x W_g) gate before the out-projection.

Stability by construction (the bound; tested at saturated gate logits)
--------------------------------------------------------------------
Gates per token and head, theta_t = max_lr * sigmoid(.), eta_t = max_momentum * sigmoid(.) with
max_momentum < 1, alpha_t = max_forget * sigmoid(.). Every token's gradient u_t (all layers
together, taken at the chunk-start weights, of the un-halved loss) is soft-clipped,
u_t -> s_t u_t with s_t = (1 + ||u_t||^2 / G^2)^(-1/2), so ||s_t u_t|| < G = max_grad_norm
whatever the error. Then, for any inputs and any gate logits, at any chunk size:

    ||S_t|| <= eta_max ||S_{t-1}|| + theta_max G   =>   ||S_t|| <= R := theta_max G / (1 - eta_max)

(by induction, S_0 = 0; in a chunk S_t = E_t S_0 - sum_i D_ti s_i u_i with D_ti = theta_i E_t/E_i,
and sum_i D_ti <= theta_max / (1 - eta_max)), and M_t = (1 - alpha_t) M_{t-1} + S_t gives

    ||M_t|| <= ||M_0|| + t R          (never more than linear growth), and with alpha >= alpha_min > 0
    ||M_t|| <= max(||M_0||, R / alpha_min).

Without the clip the gradient grows with the error it corrects, so a too-large step (theta
times the curvature 2||k||^2, amplified by up to 1/(1 - eta) through momentum and by up to
chunk_size when one chunk's gradients all see the same weights) feeds back exponentially:
the runaways the tests reproduce. ``describe`` and the training log show R and the gates.

Defaults by measurement
-----------------------
The deep memory (depth 2) is wrapped as TTT's and titans-pytorch's inner model,
M(x) = x + LN(MLP(x)), with chunks of 16 tokens. Measured on single-needle NIAH (the
``titans-niah`` reproduction's task: one needle in 128 noise tokens, d 64, 2 layers, 400 steps
of 32, seed 0; held-out accuracy, chance 1/16): the plain deep memory stays at chance with
chunks of 64 (0.07; 0.06 at step 600 of a 1000-step run) and of 16 (0.07; 0.06 at step 800
of 1000), as does it with a bias, ReLU or M_0 scale 0.3; the residual alone reaches 0.84,
the LayerNorm alone 1.00 from step 250, both together solve it (1.00 from step 200; at
chunk 64 they reach 0.68 at step 400). The linear memory (depth 1, chunk 16) solves it
without either. The paper's exact memory is given below.

The M_0 scale is 3 by measurement: on MQAR with 16 pairs in 128 tokens
(``recipes/reproduce/titans-mqar-16pairs.yaml``) the deep memory with M_0 ~ N(0, 1/d_in) learns
recall far more slowly than TTT-Linear (0.30 / 0.83 / 0.83 on seeds 0 / 1 / 2 vs 0.99 / 0.99 /
1.00 after 1000 steps); a linear memory reaches 0.99 by step 600 (seed 0), and momentum off 0.72
by step 400 where scale 1 is at 0.11: the deep memory's small initial features make its writes
weak. Scale 2 gives 0.99 / 0.89 / 0.99 (seed 1 escapes the 0.1 plateau late), scale 3 0.999 /
0.997 / 0.996 (held-out accuracy during training; the report's mean 0.997 +- 0.001). At scale 2
unnormalised q, k (0.999) or a lower initial momentum (``init_momentum: 0.1``, 0.994) lift the
hard seed 1 as much; scale 3 keeps the paper's L2 norm and momentum. With scale 2 (seed 0)
the other reproductions' LMM is unchanged or better: S-NIAH 1.000 at 128-1024 tokens, 4-pair
MQAR 0.9995 (vs 1.000), the byte-level LM of ``titans-ablations`` 2.9625 bpb (vs 3.0672); the
reproductions at scale 3 are in ``docs/results/``.

On S-NIAH at scale 3 (the ``titans-niah`` task) seeds 1 and 2 retrieve at 1.000 at 128-1024
tokens; seed 0 reaches 1.000 at 128-512 and 0.754 at 1024 (scales 1 and 2 kept 1.000 on seed
0). Measured alternatives on seed 0: scale 2 with unnormalised q, k keeps 0.988 at 1024 (16-pair
MQAR 0.991 / 0.999 / 0.997), scale 2 with ``init_momentum: 0.1`` keeps 1.000 (16-pair MQAR 0.979).

Ablation switches (the paper's table 5): ``linear_memory`` (L_M = 1), ``conv=False``,
``momentum=False`` (eta = 0), ``forgetting=False`` (alpha = 0). Persistent memory belongs to
the hybrid blocks (MAC / MAG / MAL), not to this mixer. The paper's exact memory is
``{value_path: silu_conv, qk_norm: l2, bias: false, memory_norm: none, residual: false}``.
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
from seqzoo.ops.titans import ACTIVATIONS, TitansState, memory_read, titans_memory


class TitansConfig(MixerConfig):
    n_heads: int = Field(4, ge=1)
    depth: int = Field(2, ge=1, le=4, description="memory MLP layers L_M (1 = matrix memory)")
    expansion: int = Field(4, ge=1, description="hidden width of the memory MLP / head dim")
    activation: str = Field("silu", description="the memory MLP's activation")
    # -- the memory's architecture ---------------------------------------------------------
    bias: bool = Field(False, description="a bias per memory layer, trained by the inner loop too. Off by "
                                          "default: with L2-normalised keys the bias's constant-1 input is as "
                                          "large as a key, so every write moves it and disturbs every stored "
                                          "association")
    memory_norm: Literal["none", "layernorm"] = Field(
        "layernorm", description="an outer LayerNorm on the memory's output (TTT, titans-pytorch); its "
                                 "affine parameters are learned by the outer loop only. On by default: "
                                 "see 'Defaults by measurement' in the module doc")
    residual: bool = Field(True, description="residual memory M(x) = x + MLP(x), x + LN(MLP(x)) with "
                                             "memory_norm (TTT, titans-pytorch); on by default, see the module doc")
    init_scale: float = Field(3.0, gt=0, description="M_0 ~ N(0, init_scale^2 / d_in) per layer; 3 by "
                                                     "measurement (module doc), 1 is the usual fan-in scale")
    # -- projections -----------------------------------------------------------------------
    conv: bool = Field(True, description="short causal depthwise conv (then SiLU) on q, k (and v "
                                         "with value_path=silu_conv)")
    conv_size: int = Field(4, ge=1)
    qk_norm: Literal["l2", "none"] = Field("l2", description="L2-normalise q and k (the paper, section 4.4)")
    value_path: Literal["silu_conv", "linear"] = Field(
        "linear", description="silu_conv: v = SiLU(conv(x W_v)) as the paper; linear: v = x W_v")
    # -- chunking ----------------------------------------------------------------------------
    chunk_size: int = Field(16, ge=1, description="tokens per chunk b (gradients at chunk-start weights); "
                                                  "16 by default, see the module doc")
    read: Literal["token", "chunk_start"] = "token"
    # -- gates and the stability bound (module docstring) -----------------------------------
    max_lr: float = Field(0.5, gt=0, le=10, description="theta_t = max_lr * sigmoid(.)")
    max_momentum: float = Field(0.9, gt=0, lt=1, description="eta_t = max_momentum * sigmoid(.); < 1 bounds "
                                                              "the momentum's gain 1 / (1 - eta)")
    max_forget: float = Field(1.0, gt=0, le=1, description="alpha_t = max_forget * sigmoid(.)")
    max_grad_norm: float = Field(4.0, gt=0, description="G: every token's gradient is soft-clipped to a "
                                                         "norm below G")
    init_lr: float = Field(0.2, gt=0, lt=1, description="initial theta_t / max_lr")
    init_momentum: float = Field(0.5, gt=0, lt=1, description="initial eta_t / max_momentum")
    init_forget: float = Field(0.001, gt=0, lt=1, description="initial alpha_t / max_forget")
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

    @property
    def step_bound(self) -> float:
        """R = theta_max G / (1 - eta_max): no token moves the memory weights by more."""
        eta_max = self.max_momentum if self.momentum else 0.0
        return self.max_lr * self.max_grad_norm / (1 - eta_max)


class TitansMixerState(NamedTuple):
    conv: Tensor          # (B, C_conv, conv_size - 1) short-conv inputs (q, k and, if convolved, v)
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
        "bias": [False, True],
        "memory_norm": ["none", "layernorm"],
        "value_path": ["silu_conv", "linear"],
        "qk_norm": ["l2", "none"],
    }

    def __init__(self, config: TitansConfig, *, d_model: int, layer_idx: int = 0) -> None:
        super().__init__(config, d_model=d_model, layer_idx=layer_idx)
        h = self.n_heads = config.n_heads
        k = self.head_dim = d_model // h
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.conv_value = config.value_path == "silu_conv"
        conv_width = (3 if self.conv_value else 2) * d_model
        self.conv = ShortConv(conv_width, kernel_size=config.conv_size) if config.conv else None
        self.gates = nn.Linear(d_model, 3 * h)  # theta, eta, alpha per head
        with torch.no_grad():
            self.gates.weight.mul_(0.1)  # start near the initial gate values below
            init = (config.init_lr, config.init_momentum, config.init_forget)
            self.gates.bias.copy_(torch.tensor([_logit(p) for p in init]).repeat_interleave(h))
        dims = [k] + [k * config.expansion] * (config.memory_depth - 1) + [k]
        bias = int(config.bias)
        # Learnable initial memory weights M_0 per head (the outer loop learns them); with
        # ``bias`` each layer's last row is its bias (the weight of a constant-1 input), zero at init.
        self.memory = nn.ParameterList(
            nn.Parameter(torch.cat([torch.randn(h, dims[i], dims[i + 1]) * (config.init_scale / math.sqrt(dims[i])),
                                    torch.zeros(h, bias, dims[i + 1])], 1))
            for i in range(config.memory_depth))
        if config.memory_norm == "layernorm":
            self.ln_weight = nn.Parameter(torch.ones(h, k))
            self.ln_bias = nn.Parameter(torch.zeros(h, k))
        self.gate_proj = nn.Linear(d_model, d_model, bias=False)
        self.norm = GatedRMSNorm(k)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self._telemetry: dict[str, Tensor] = {}  # gate and weight statistics of the last training call

    # -- the memory's options, as the op takes them -----------------------------------------
    @property
    def _ln(self) -> tuple[Tensor, Tensor] | None:
        return (self.ln_weight, self.ln_bias) if self.config.memory_norm == "layernorm" else None

    def _memory_options(self) -> dict:
        c = self.config
        return dict(activation=c.activation, residual=c.residual, bias=c.bias, ln=self._ln)

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> TitansMixerState:
        weights = tuple(repeat(w.to(device=device, dtype=dtype), "h i o -> b h i o", b=batch_size)  # (B, H, d_in, d_out)
                        for w in self.memory)
        memory = TitansState(weights, weights, tuple(torch.zeros_like(w) for w in weights), 0)
        conv = (self.conv.init_state(batch_size, device=device, dtype=dtype) if self.conv is not None
                else torch.zeros(batch_size, 0, 0, device=device, dtype=dtype))
        return TitansMixerState(conv, memory)

    def project(self, x: Tensor, conv_state: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """q, k, v (B, T, H, K) of x (B, T, D) and the new short-conv state."""
        q, k, v = self.qkv(x).split(self.d_model, dim=-1)
        mixed = torch.cat([q, k, v], -1) if self.conv_value else torch.cat([q, k], -1)  # (B, T, 2D or 3D)
        if self.conv is not None:
            mixed, conv_state = self.conv(mixed, conv_state)
        else:
            mixed = F.silu(mixed)
        if self.conv_value:
            q, k, v = mixed.split(self.d_model, dim=-1)
        else:
            q, k = mixed.split(self.d_model, dim=-1)
        q, k, v = (rearrange(z, "b t (h d) -> b t h d", h=self.n_heads) for z in (q, k, v))  # (B, T, H, K)
        if self.config.qk_norm == "l2":
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        return q, k, v, conv_state

    def _gates(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c = self.config
        theta, eta, alpha = rearrange(torch.sigmoid(self.gates(x)), "b t (g h) -> g b t h", g=3)  # (B, T, H)
        theta = c.max_lr * theta
        eta = c.max_momentum * eta if c.momentum else torch.zeros_like(eta).detach()
        alpha = c.max_forget * alpha if c.forgetting else torch.zeros_like(alpha).detach()
        return theta, eta, alpha

    def _output(self, o: Tensor, x: Tensor) -> Tensor:
        """RMSNorm(o) * SiLU(x W_g), then the out-projection: (B, T, H, V) -> (B, T, D)."""
        gate = rearrange(self.gate_proj(x), "b t (h d) -> b t h d", h=self.n_heads)  # (B, T, H, V)
        return self.out(rearrange(self.norm(o, gate), "b t h d -> b t (h d)"))  # (B, T, D)

    def forward(self, x: Tensor, state: TitansMixerState | None = None) -> tuple[Tensor, TitansMixerState]:
        state = state if state is not None else self.default_state(x)
        q, k, v, conv_state = self.project(x, state.conv)
        theta, eta, alpha = self._gates(x)
        o, memory = titans_memory(q, k, v, theta, eta, alpha, None, chunk_size=self.config.chunk_size,
                                  read=self.config.read, initial_state=state.memory, output_final_state=True,
                                  max_grad_norm=self.config.max_grad_norm, **self._memory_options())
        if self.training and x.shape[1]:
            self._record(k, theta, eta, alpha, memory)
        return self._output(o, x), TitansMixerState(conv_state, memory)

    def read(self, x: Tensor, weights: tuple[Tensor, ...], conv_state: Tensor) -> tuple[Tensor, Tensor]:
        """M(q(x)) with the given memory weights, without writing, through the projections and
        output head: (B, n, D) -> (B, n, D), and the new short-conv state (MAC's h = M*_{s-1}(q))."""
        q, _, _, conv_state = self.project(x, conv_state)
        return self._output(memory_read(weights, q, **self._memory_options()), x), conv_state

    def step(self, x: Tensor, state: TitansMixerState) -> tuple[Tensor, TitansMixerState]:
        y, state = self.forward(x[:, None], state)
        return y[:, 0], state

    # -- telemetry ---------------------------------------------------------------------------
    @torch.no_grad()
    def _record(self, k: Tensor, theta: Tensor, eta: Tensor, alpha: Tensor, memory: TitansState) -> None:
        """The inner loop at a glance: the mean effective write 2 theta ||k||^2 (the step along
        a key for a matrix memory, before the soft clip), the mean gates, and the memory's
        weight norm (all layers, per head, averaged) after the call."""
        norm = torch.stack([w.float().pow(2).sum((-2, -1)) for w in memory.weights]).sum(0).sqrt()  # (B, H)
        self._telemetry = {"write": (2 * theta * k.pow(2).sum(-1)).mean(), "theta": theta.mean(), "eta": eta.mean(),
                           "alpha": alpha.mean(), "weight_norm": norm.mean()}

    def telemetry(self) -> dict[str, float]:
        """The statistics of the last training call (``seqzoo.train.loggers.module_telemetry``
        logs them as ``<module name>/<key>``: write, theta, eta, alpha, weight_norm)."""
        return {key: float(value) for key, value in self._telemetry.items()}

    def gate_ranges(self) -> str:
        """A one-line summary of the parameterisation, for ``describe``."""
        c = self.config
        eta = f"[0, {c.max_momentum:g})" if c.momentum else "0"
        alpha = f"[0, {c.max_forget:g})" if c.forgetting else "0"
        return (f"theta in [0, {c.max_lr:g}), eta in {eta}, alpha in {alpha}, grad norm < {c.max_grad_norm:g}, "
                f"step bound R = {c.step_bound:.3g}")
