"""Softmax attention as in Transformer++ (Vaswani et al. 2017; Touvron et al. 2023):
RoPE, causal full or sliding-window attention, optional learnable persistent prefix
(Titans paper eq. 19: N_p tokens that every position sees), KV-cache decode with a ring
buffer of W slots for sliding windows, and an optional short causal depthwise convolution on
q, k, v (``conv_size``; off by default) — the previous-token path every recurrent mixer in
this library has, as in H3 / Based (Fu et al. 2023; Arora et al. 2024, "Simple linear
attention language models balance the recall-throughput tradeoff"): with it a single layer
can attend to "the token after a match", which plain attention must first learn with a
previous-token head. Backends: "sdpa" (PyTorch's fused
scaled_dot_product_attention; a fresh full causal call passes ``is_causal`` so that on CUDA
it runs FlashAttention) and "reference" (plain softmax, readable).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import Field
from torch import Tensor, nn

from seqzoo.layers.rotary import Rotary
from seqzoo.layers.short_conv import ShortConv
from seqzoo.mixers.base import ConfigError, MixerConfig, TokenMixer, register


class AttentionConfig(MixerConfig):
    n_heads: int = Field(4, ge=1)
    window: int | None = Field(None, ge=1, description="sliding window W (None = full causal)")
    n_persistent: int = Field(0, ge=0, description="learnable persistent prefix tokens N_p")
    rope_base: float = Field(10000.0, gt=0)
    conv_size: int | None = Field(
        None, ge=2, description="kernel of a short causal depthwise conv (no activation) on q, k, v before "
                                "RoPE; None = plain attention (Transformer++)")

    def check(self, d_model: int) -> None:
        self.require_divisible("n_heads", self.n_heads, d_model)
        if (d_model // self.n_heads) % 2:
            raise ConfigError("n_heads", f"head dim d_model/n_heads={d_model // self.n_heads} must be even for RoPE")


class AttentionState(NamedTuple):
    k: Tensor  # (B, H, S, K) rotated keys; S grows (full) or is the ring of W slots (window)
    v: Tensor  # (B, H, S, K)
    pos: int   # tokens seen so far
    conv: Tensor | None = None  # (B, 3D, conv_size - 1) last q/k/v projections; None without the conv


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, *, backend: str, causal: bool = False) -> Tensor:
    """q: (B, H, T, K), k, v: (B, H, S, K), mask: (T, S) bool (True = visible). ``causal``:
    the mask is exactly the square causal one, so SDPA may pick FlashAttention (on CUDA;
    an explicit mask rules it out)."""
    if backend == "sdpa":
        if causal:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = torch.einsum("bhtk,bhsk->bhts", q, k) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhts,bhsk->bhtk", scores.softmax(-1), v)


@register
class Attention(TokenMixer):
    name = "attention"
    Config = AttentionConfig
    backends = ("sdpa",)
    test_space = {"n_heads": [1, 2, 4], "window": [None, 1, 3, 8], "n_persistent": [0, 2], "conv_size": [None, 2, 4]}

    def __init__(self, config: AttentionConfig, *, d_model: int, layer_idx: int = 0) -> None:
        super().__init__(config, d_model=d_model, layer_idx=layer_idx)
        self.n_heads = config.n_heads
        self.head_dim = d_model // config.n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.rotary = Rotary(self.head_dim, base=config.rope_base)
        self.conv = (ShortConv(3 * d_model, kernel_size=config.conv_size, activation=None)
                     if config.conv_size else None)
        self.persistent = (nn.Parameter(torch.randn(config.n_persistent, d_model) * 0.02)
                           if config.n_persistent else None)

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> AttentionState:
        slots = self.config.window or 0  # full attention starts with an empty cache
        shape = (batch_size, self.n_heads, slots, self.head_dim)
        empty = torch.zeros(shape, device=device, dtype=dtype)
        conv = self.conv.init_state(batch_size, device=device, dtype=dtype) if self.conv is not None else None
        return AttentionState(empty, empty.clone(), 0, conv)

    def project(self, x: Tensor, offset: int, conv: ShortConv | None, conv_state: Tensor | None
                ) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor | None]:
        """(q, k, v) each (B, H, T, K), rotated from absolute position ``offset``, with ``conv``
        over the projections (this module's own, or a hybrid's for another stream), and the
        conv's new state (None without a conv)."""
        qkv = self.qkv(x)  # (B, T, 3D)
        if conv is not None:
            qkv, conv_state = conv(qkv, conv_state)
        q, k, v = rearrange(qkv, "b t (three h k) -> three b t h k", three=3, h=self.n_heads)
        q, k = self.rotary(q, offset), self.rotary(k, offset)
        return tuple(rearrange(z, "b t h k -> b h t k") for z in (q, k, v)), conv_state  # (B, H, T, K)

    def _persistent_kv(self, batch: int) -> tuple[Tensor, Tensor] | None:
        if self.persistent is None:
            return None
        _, k, v = rearrange(self.qkv(self.persistent), "p (three h k) -> three h p k", three=3, h=self.n_heads)
        # Position-free: no rotary, so every query sees them alike.
        return k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)  # (B, H, N_p, K)

    def _past(self, state: AttentionState) -> tuple[Tensor, Tensor, Tensor]:
        """Cached keys/values in chronological order and their absolute positions."""
        w, pos = self.config.window, state.pos
        if w is None:
            positions = torch.arange(pos, device=state.k.device)
            return state.k, state.v, positions
        n = min(pos, w)
        start = pos - n
        positions = torch.arange(start, pos, device=state.k.device)
        slots = positions % w
        return state.k[:, :, slots], state.v[:, :, slots], positions

    def forward(self, x: Tensor, state: AttentionState | None = None) -> tuple[Tensor, AttentionState]:
        state = state if state is not None else self.default_state(x)
        b, t, _ = x.shape
        pos = state.pos
        (q, k, v), conv = self.project(x, pos, self.conv, state.conv)
        k_past, v_past, p_past = self._past(state)
        keys, values = torch.cat([k_past, k], 2), torch.cat([v_past, v], 2)  # (B, H, S, K)
        key_pos = torch.cat([p_past, torch.arange(pos, pos + t, device=x.device)])
        q_pos = torch.arange(pos, pos + t, device=x.device)
        mask = key_pos[None, :] <= q_pos[:, None]  # (T, S)
        if self.config.window is not None:
            mask &= (q_pos[:, None] - key_pos[None, :]) < self.config.window
        prefix = self._persistent_kv(b)
        if prefix is not None:
            keys, values = torch.cat([prefix[0], keys], 2), torch.cat([prefix[1], values], 2)
            mask = torch.cat([mask.new_ones(t, prefix[0].shape[2]), mask], 1)
        causal = prefix is None and self.config.window is None and pos == 0  # a fresh full-attention call
        o = attend(q, keys, values, mask, backend=self.backend, causal=causal)
        y = self.out(rearrange(o, "b h t k -> b t (h k)"))
        return y, self._new_state(state, k, v, conv)

    def _new_state(self, state: AttentionState, k: Tensor, v: Tensor, conv: Tensor | None) -> AttentionState:
        t, w, pos = k.shape[2], self.config.window, state.pos
        if w is None:
            return AttentionState(torch.cat([state.k, k], 2), torch.cat([state.v, v], 2), pos + t, conv)
        keep = min(t, w)
        slots = torch.arange(pos + t - keep, pos + t, device=k.device) % w
        # Out-of-place writes into the ring buffer: the caller's state stays untouched.
        new_k = state.k.index_copy(2, slots, k[:, :, t - keep:])
        new_v = state.v.index_copy(2, slots, v[:, :, t - keep:])
        return AttentionState(new_k, new_v, pos + t, conv)

    def step(self, x: Tensor, state: AttentionState) -> tuple[Tensor, AttentionState]:
        y, state = self.forward(x[:, None], state)
        return y[:, 0], state
