"""TTT-Linear and TTT-MLP (Sun et al. 2024, "Learning to (Learn at Test Time): RNNs with
Expressive Hidden States"; DESIGN.md 5.8) on the Titans test-time-learning engine.

Inner model (paper section 2 and its "LN and residual" design): f(x; W) = x + LN(g(x; W)),
g = x W + b (TTT-Linear) or a two-layer GELU MLP with 4x hidden (TTT-MLP); the LayerNorm's
(gamma, beta) are outer parameters, not trained by the inner loop. Inner loss
||f(k_t) - v_t||^2 with k, v, q = x theta_K, x theta_V, x theta_Q per head; output
z_t = f(q_t; W_t). Mini-batch GD of size b (the engine's chunk): every gradient of a
mini-batch is taken at its first weights, W_t = W_{t'} - sum_{s=t'+1..t} eta_s grad_s
(dual form: all W_t of the mini-batch are never materialised), primal across mini-batches.
Learnable per-token inner learning rate eta_t = base_lr * sigmoid(x w_lr + b_lr) / K (paper
section 2.7; the 1/K as in the authors' code) for the gradient of 1/2 ||.||^2, i.e. the
engine's theta_t = eta_t / 2 for its un-halved loss; no momentum, no forgetting. The initial
inner weights W_0 (and biases) are learnable per head.

Output: LayerNorm over the heads' concatenated outputs, times GELU(x W_g), out-projection
(the paper's Mamba-backbone block); optional short causal conv on q and k.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from pydantic import Field
from torch import Tensor, nn

from seqzoo.layers.short_conv import ShortConv
from seqzoo.mixers.base import MixerConfig, TokenMixer, register
from seqzoo.ops.titans import TitansState, titans_memory


class TTTConfig(MixerConfig):
    n_heads: int = Field(4, ge=1)
    mini_batch: int = Field(16, ge=1, description="inner mini-batch size b")
    base_lr: float = Field(1.0, gt=0, description="eta_t = base_lr * sigmoid(.) / head_dim")
    conv: bool = Field(True, description="short causal conv on q and k (Mamba backbone)")
    conv_size: int = Field(4, ge=1)
    ln_eps: float = Field(1e-6, gt=0)

    def check(self, d_model: int) -> None:
        self.require_divisible("n_heads", self.n_heads, d_model)


class TTTMLPConfig(TTTConfig):
    base_lr: float = Field(0.1, gt=0, description="eta_t = base_lr * sigmoid(.) / head_dim")
    expansion: int = Field(4, ge=1, description="hidden width of the inner MLP / head dim")


class TTTState(NamedTuple):
    conv: Tensor          # (B, 2D, conv_size - 1) short-conv inputs of q and k
    memory: TitansState   # inner weights at mini-batch start, current, (zero) momentum, position


class _TTT(TokenMixer):
    """Shared body; subclasses give the inner model's layer widths and activation."""

    activation: ClassVar[str] = "identity"

    def _inner_dims(self) -> list[int]:
        raise NotImplementedError

    def __init__(self, config: TTTConfig, *, d_model: int, layer_idx: int = 0) -> None:
        super().__init__(config, d_model=d_model, layer_idx=layer_idx)
        h = self.n_heads = config.n_heads
        self.head_dim = d_model // h
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.conv = ShortConv(2 * d_model, kernel_size=config.conv_size, activation=None) if config.conv else None
        self.lr = nn.Linear(d_model, h)
        dims = self._inner_dims()
        # W_0 and b_0 per head; the bias is the last row (weight of a constant-1 input).
        self.inner = nn.ParameterList(
            nn.Parameter(torch.cat([torch.randn(h, dims[i], dims[i + 1]) * 0.02, torch.zeros(h, 1, dims[i + 1])], 1))
            for i in range(len(dims) - 1))
        self.ln_weight = nn.Parameter(torch.ones(h, self.head_dim))
        self.ln_bias = nn.Parameter(torch.zeros(h, self.head_dim))
        self.gate = nn.Linear(d_model, d_model, bias=False)
        self.post_norm = nn.LayerNorm(d_model, eps=config.ln_eps)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> TTTState:
        weights = tuple(repeat(w.to(device=device, dtype=dtype), "h i o -> b h i o", b=batch_size)  # (B, H, d_in+1, d_out)
                        for w in self.inner)
        memory = TitansState(weights, weights, tuple(torch.zeros_like(w) for w in weights), 0)
        conv = (self.conv.init_state(batch_size, device=device, dtype=dtype) if self.conv is not None
                else torch.zeros(batch_size, 2 * self.d_model, 0, device=device, dtype=dtype))
        return TTTState(conv, memory)

    def forward(self, x: Tensor, state: TTTState | None = None) -> tuple[Tensor, TTTState]:
        state = state if state is not None else self.default_state(x)
        c = self.config
        qk, v = self.qkv(x).split([2 * self.d_model, self.d_model], dim=-1)
        conv_state = state.conv
        if self.conv is not None:
            qk, conv_state = self.conv(qk, state.conv)
        q, k = rearrange(qk, "b t (g h d) -> g b t h d", g=2, h=self.n_heads)  # (B, T, H, K)
        v = rearrange(v, "b t (h d) -> b t h d", h=self.n_heads)  # (B, T, H, K)
        eta = c.base_lr * torch.sigmoid(self.lr(x)) / self.head_dim  # (B, T, H)
        zeros = torch.zeros_like(eta).detach()
        o, memory = titans_memory(q, k, v, eta / 2, zeros, zeros, None, chunk_size=c.mini_batch,
                                  activation=self.activation, read="token", initial_state=state.memory,
                                  output_final_state=True, residual=True, bias=True,
                                  ln=(self.ln_weight, self.ln_bias), ln_eps=c.ln_eps)
        y = self.post_norm(rearrange(o, "b t h d -> b t (h d)"))  # (B, T, D)
        y = y * F.gelu(self.gate(x), approximate="tanh")
        return self.out(y), TTTState(conv_state, memory)

    def step(self, x: Tensor, state: TTTState) -> tuple[Tensor, TTTState]:
        y, state = self.forward(x[:, None], state)
        return y[:, 0], state


@register
class TTTLinear(_TTT):
    name = "ttt_linear"
    Config = TTTConfig
    # chunk size 1 is covered by the titans mixer on the same engine; these keep CI short
    test_space = {"n_heads": [1, 2], "mini_batch": [3, 8], "conv": [True, False]}

    def _inner_dims(self) -> list[int]:
        return [self.head_dim, self.head_dim]


@register
class TTTMLP(_TTT):
    name = "ttt_mlp"
    Config = TTTMLPConfig
    activation = "gelu_tanh"
    test_space = {"n_heads": [2], "mini_batch": [3, 8], "expansion": [2]}

    def _inner_dims(self) -> list[int]:
        k = self.head_dim
        return [k, k * self.config.expansion, k]


__all__ = ["TTTLinear", "TTTMLP", "TTTState"]
