"""The Titans hybrids (Behrouz, Zhong & Mirrokni 2024, "Titans: Learning to Memorize at Test
Time", section 4) as composite token mixers, so that a recipe names them like any other
mixer and the generic invariants (causality, chaining, step == forward) check them.

* ``titans_mac`` — Memory as a Context (eq. 21-25, figure 3a). Per segment S of length C:
  the segment's queries read the memory *as it was before the segment* (h = M*_{s-1}(q), no
  write); causal attention over [persistent ‖ h ‖ S]; the attention outputs y (eq. 24; by
  default the segment's tokens, see below) are written into the memory by a causal memory
  pass that also returns its read-out; the output combines both, o = y ⊗ M_t(·). A read-out
  h_j comes from x_j, so the attention mask lets position i see h_j and x_j only for j ≤ i
  (a per-position mask, DESIGN.md section 4).
* ``titans_mag`` — Memory as a Gate (eq. 26-28, figure 3b): sliding-window attention whose
  persistent prefix stays visible, in parallel with the memory over [persistent ‖ x];
  outputs normalised with learnable vector weights and combined by o = ŷ ⊙ σ(m̂).
* ``titans_mal`` — Memory as a Layer (eq. 29-31): y = M([persistent ‖ x]), o = SW-Attn(y); by
  default with the attention as a residual layer, o = y + SW-Attn(RMSNorm(y)) (see below).

The LMM variant (the memory alone in every block) is the ``titans`` mixer itself.

In MAG and MAL the memory branch is any registered mixer (``memory: {type: titans, ...}``,
validated strictly); its persistent prefix is run through it from its initial state, so the
memory has already consumed [p_1 .. p_Np] when the first real token arrives (eq. 26 / 29).
MAC's memory must be the ``titans`` mixer: besides writing and reading it (its forward), MAC
reads it *without writing*, with the segment-start weights, through its projections and
output head and ``seqzoo.ops.titans.memory_read``. All four variants therefore share one
memory module (DESIGN.md 5.9), as the paper's comparison assumes.

MAC's defaults by measurement (MQAR, 4 pairs in 64 tokens, d 64, 2 layers, 1000 steps of 64,
seed 0; ``recipes/reproduce/titans-mqar-hybrids.yaml``; held-out accuracy at steps 300 / 1000):

| MAC variant | step 300 | step 1000 |
|---|---:|---:|
| the paper's eq. 21-25 (writes y, attention without conv) | 0.30 | 0.291 |
| + short conv on the attention's q, k, v (section 4.4) | 0.31 | 0.716 |
| + conv, the memory writes the segment's tokens x | 0.46 | see the default row of the reproduction |

Written as eq. 24 says, the memory stores the attention outputs y, which at initialisation are
running averages over the segment, so the keys it writes cannot yet be told apart, and the
recall path needs the attention, the memory's keys (on y) and its queries (on x) to align at
once; the model sits on the 0.3 plateau (one of the four values in context). The conv lets
attention recall inside a segment and lifts it to 0.72; storing the tokens themselves — what
titans-pytorch's MAC does — makes the memory's keys and queries come from one stream and
reaches 0.97 by step 400. The paper's write stays one key away (``write: attention_output``).

The attention's short conv (``attn_conv_size``, section 4.4's conv after every q/k/v
projection) is on by default in MAC and MAG, by the same MQAR measurement. MAG on three seeds
of ``recipes/compare/mqar.yaml`` (held-out accuracy at step 1000, seeds 0 / 1 / 2): without it
0.999 / 0.761 / 0.999 (seed 1 sits on the 0.3 plateau until step 600 and is still climbing at
step 1000), with it 1.000 / 1.000 / 0.999 (0.997 / 0.998 / 0.997 by step 600). It is not free
elsewhere: on the other ``recipes/compare/`` sweeps (3 seeds, 250-300 steps, last held-out
accuracy, with / without the conv) s5 0.070 / 0.070 and parity 0.754 / 0.753 are unchanged;
bytes 0.462 / 0.471, selective copy 0.466 ± 0.039 / 0.539 ± 0.133 and induction 0.61 ± 0.23 /
0.69 ± 0.42 are lower; on needle-in-a-haystack seed 0 learns later (0.25 at step 300 against
1.00; 0.98 by step 500 of a 600-step run), the other seeds reach 1.00 with both. The default
follows section 4.4 and the recall measurement; ``attn_conv_size: null`` is the plain figure 3b.
MAL as eq. 31 (no ``residual``) is slower with the conv (0.30 / 0.30 / 0.30, still on the
plateau at step 600) than without (0.30 / 0.32 / 0.94), and with ``residual`` needs none, so
MAL keeps the plain attention.

MAL's default by measurement (same MQAR, held-out accuracy at step 1000, seeds 0 / 1 / 2). Eq. 31
as written, o = SW-Attn(y), sends the memory's read-out only through the attention, which at
initialisation averages it over the window; the model sits on the plateau where the attention
must learn to attend to its own position before the memory's recall can reach the output, and
whether it leaves depends on the seed: 0.29 / 0.98 / 0.31 with the memory's M_0 scale 3 (at
scale 1: 0.99 on seed 0, 0.30 at step 800 on seed 2). The paper runs MAL "similar to H3": the
memory and the attention as stacked layers, each with its residual path (section 4.3). With
``residual`` (the default), o = y + SW-Attn(RMSNorm(y)), the read-out reaches the output
directly: 1.000 / 1.000 / 1.000, off the plateau by step 200-300 on every seed (0.99 / 0.63 /
0.99 at step 300). ``residual: false`` keeps eq. 31 literally.

Settings that cannot work are ConfigErrors naming the key: heads not dividing d_model or an
odd head dim (RoPE), an unknown / nested memory type, a memory key the memory rejects
(``memory.<key>``), and for MAC a memory chunk that does not divide the segment.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import Field
from torch import Tensor, nn

from seqzoo.layers.norms import RMSNorm
from seqzoo.layers.short_conv import ShortConv
from seqzoo.mixers.attention import Attention, AttentionConfig, AttentionState, attend
from seqzoo.mixers.base import (
    ConfigError, MixerConfig, State, TokenMixer, get, make_config, register,
)
from seqzoo.mixers.titans import Titans, TitansMixerState


# -- shared pieces -----------------------------------------------------------------------
def cast_state(obj: Any, *, dtype: torch.dtype | None, device: torch.device | str | None) -> Any:
    """A copy of a (nested NamedTuple / tuple) state with floating tensors moved to dtype/device."""
    if isinstance(obj, Tensor):
        return obj.to(device=device, dtype=dtype if obj.is_floating_point() and dtype else obj.dtype)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(cast_state(o, dtype=dtype, device=device) for o in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(cast_state(o, dtype=dtype, device=device) for o in obj)
    return obj


def _attention(d_model: int, *, n_heads: int, window: int | None, n_persistent: int, rope_base: float,
               backend: str, conv_size: int | None) -> Attention:
    config = AttentionConfig(n_heads=n_heads, window=window, n_persistent=n_persistent,
                             rope_base=rope_base, backend=backend, conv_size=conv_size)
    return Attention(config, d_model=d_model)


def _check_attention(d_model: int, n_heads: int) -> None:
    MixerConfig.require_divisible("n_heads", n_heads, d_model)
    if (d_model // n_heads) % 2:
        raise ConfigError("n_heads", f"head dim d_model/n_heads={d_model // n_heads} must be even for RoPE")


class _HybridConfig(MixerConfig):
    """Settings shared by the three hybrids: attention heads, persistent tokens, the memory."""

    n_heads: int = Field(4, ge=1, description="attention heads")
    n_persistent: int = Field(4, ge=0, description="persistent memory tokens N_p (eq. 19)")
    rope_base: float = Field(10000.0, gt=0)
    attn_conv_size: int | None = Field(
        None, ge=2, description="short causal depthwise conv on the attention's q, k, v (section 4.4 puts one "
                                "after every q/k/v projection); None = plain attention. On by default in MAC "
                                "only, see the module doc")
    memory: dict[str, Any] = Field(default_factory=lambda: {"type": "titans"},
                                   description="the memory: `type` (a registered mixer) + its own settings")

    def memory_config(self, d_model: int) -> tuple[str, MixerConfig]:
        """(type, validated config) of the memory; errors are named memory.<key>."""
        spec = dict(self.memory)
        kind = spec.pop("type", None)
        if not isinstance(kind, str):
            raise ConfigError("memory.type", "expected the name of a registered mixer, e.g. {type: titans}")
        if kind in ("titans_mac", "titans_mag", "titans_mal"):
            raise ConfigError("memory.type", f"a Titans hybrid cannot be the memory of another, got {kind!r}")
        try:
            return kind, make_config(kind, spec, d_model=d_model)
        except ConfigError as err:
            raise ConfigError(f"memory.{err.key}", err.message) from None

    def check(self, d_model: int) -> None:
        _check_attention(d_model, self.n_heads)
        self.memory_config(d_model)


class _MemoryBranchConfig(_HybridConfig):
    """MAG and MAL: sliding-window attention beside / after the memory."""

    window: int = Field(64, ge=1, description="sliding window W of the attention")


def _build_memory(config: _HybridConfig, d_model: int, layer_idx: int) -> TokenMixer:
    kind, mem_config = config.memory_config(d_model)
    return get(kind)(mem_config, d_model=d_model, layer_idx=layer_idx)


class _MemoryBranchMixer(TokenMixer):
    """Common plumbing of MAG and MAL: the memory mixer, its persistent prefix, dtype care."""

    backends = ("sdpa",)

    @property
    def backend(self) -> str:
        return self.attn.backend

    def _param_dtype(self) -> torch.dtype:
        return self._param_like().dtype

    def _run_prefix(self, batch_size: int, device, dtype) -> tuple[Tensor | None, State]:
        """Run the memory over the persistent tokens from its initial state (eq. 26 / 29).
        Computed in the parameters' dtype; returns (its outputs or None, its state)."""
        pdtype = self._param_dtype()
        state = self.memory.init_state(batch_size, device=device, dtype=pdtype)
        prefix = self._persistent()
        if prefix is None:
            return None, state
        p = prefix.to(device=device)[None].expand(batch_size, -1, -1)  # (B, N_p, D)
        return self.memory(p, state)

    def _persistent(self) -> Tensor | None:
        raise NotImplementedError


# -- MAG -----------------------------------------------------------------------------------
class MAGConfig(_MemoryBranchConfig):
    """MAG's default short conv on the attention's q, k, v was chosen by measurement (module
    doc); ``attn_conv_size: null`` is figure 3b's plain sliding-window attention."""

    attn_conv_size: int | None = Field(
        4, ge=2, description="short causal depthwise conv on the attention's q, k, v (section 4.4 puts one after "
                             "every q/k/v projection); on by default (module doc); None = plain attention")


class MAGState(NamedTuple):
    attn: AttentionState
    memory: State


@register
class TitansMAG(_MemoryBranchMixer):
    """Memory as a Gate (Titans eq. 26-28). One set of persistent tokens P feeds both
    branches: it is the attention's always-visible prefix (SW-Attn*, figure 3b) and the
    first N_p tokens the memory consumes. o = RMSNorm_y(y) ⊙ σ(RMSNorm_m(M(x̃)))."""

    name = "titans_mag"
    Config = MAGConfig
    test_space = {"n_heads": [1, 2], "window": [1, 3, 8], "n_persistent": [0, 2], "attn_conv_size": [None, 3],
                  "memory": [{"type": "titans", "n_heads": 2, "chunk_size": 4, "expansion": 2},
                             {"type": "titans", "n_heads": 1, "chunk_size": 8, "depth": 1}]}

    def __init__(self, config: MAGConfig, *, d_model: int, layer_idx: int = 0) -> None:
        super().__init__(config, d_model=d_model, layer_idx=layer_idx)
        self.attn = _attention(d_model, n_heads=config.n_heads, window=config.window,
                               n_persistent=config.n_persistent, rope_base=config.rope_base,
                               backend=config.backend, conv_size=config.attn_conv_size)
        self.memory = _build_memory(config, d_model, layer_idx)
        self.norm_attn = RMSNorm(d_model)
        self.norm_memory = RMSNorm(d_model)

    def _persistent(self) -> Tensor | None:
        return self.attn.persistent  # shared by both branches

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> MAGState:
        _, memory = self._run_prefix(batch_size, device, dtype)
        state = MAGState(self.attn.init_state(batch_size, device=device, dtype=dtype), memory)
        return cast_state(state, dtype=dtype, device=device)

    def _combine(self, y: Tensor, m: Tensor) -> Tensor:
        return self.norm_attn(y) * torch.sigmoid(self.norm_memory(m))

    def forward(self, x: Tensor, state: MAGState | None = None) -> tuple[Tensor, MAGState]:
        if state is None:
            state = MAGState(self.attn.init_state(x.shape[0], device=x.device, dtype=x.dtype),
                             self._run_prefix(x.shape[0], x.device, x.dtype)[1])
        y, attn_state = self.attn(x, state.attn)
        m, memory_state = self.memory(x, state.memory)
        return self._combine(y, m), MAGState(attn_state, memory_state)

    def step(self, x: Tensor, state: MAGState) -> tuple[Tensor, MAGState]:
        y, attn_state = self.attn.step(x, state.attn)
        m, memory_state = self.memory.step(x, state.memory)
        return self._combine(y, m), MAGState(attn_state, memory_state)


# -- MAL -----------------------------------------------------------------------------------
class MALConfig(_MemoryBranchConfig):
    residual: bool = Field(
        True, description="o = y + SW-Attn(RMSNorm(y)): the attention is a residual layer over the memory's "
                          "outputs, as in the stacked hybrids (H3, Samba) the paper's MAL experiments follow "
                          "(section 4.3); the default by measurement (module doc). False = eq. 31 as written, "
                          "o = SW-Attn(y)")


class MALState(NamedTuple):
    memory: State
    attn: AttentionState


@register
class TitansMAL(_MemoryBranchMixer):
    """Memory as a Layer (Titans eq. 29-31): y = M([P ‖ x]), o = SW-Attn(y), by default
    o = y + SW-Attn(RMSNorm(y)) (``residual``, the stacked form; module doc). The memory's
    outputs at the persistent positions are the first N_p tokens the attention sees (they
    leave its window like any other token); the block's residual and MLP wrap the pair."""

    name = "titans_mal"
    Config = MALConfig
    test_space = {**TitansMAG.test_space, "residual": [False, True]}

    def __init__(self, config: MALConfig, *, d_model: int, layer_idx: int = 0) -> None:
        super().__init__(config, d_model=d_model, layer_idx=layer_idx)
        self.memory = _build_memory(config, d_model, layer_idx)
        self.attn = _attention(d_model, n_heads=config.n_heads, window=config.window, n_persistent=0,
                               rope_base=config.rope_base, backend=config.backend,
                               conv_size=config.attn_conv_size)
        self.persistent = (nn.Parameter(torch.randn(config.n_persistent, d_model) * 0.02)
                           if config.n_persistent else None)
        self.norm_attn_input = RMSNorm(d_model) if config.residual else None

    def _persistent(self) -> Tensor | None:
        return self.persistent

    def _attend(self, y: Tensor, state: AttentionState, *, step: bool = False) -> tuple[Tensor, AttentionState]:
        """SW-Attn over the memory's outputs y (eq. 31), plus y itself when ``residual``."""
        attn = self.attn.step if step else self.attn
        if self.norm_attn_input is None:
            return attn(y, state)
        o, state = attn(self.norm_attn_input(y), state)
        return y + o, state

    def _initial(self, batch_size: int, device, dtype) -> MALState:
        y_p, memory = self._run_prefix(batch_size, device, dtype)
        attn = self.attn.init_state(batch_size, device=device, dtype=self._param_dtype())
        if y_p is not None:
            _, attn = self._attend(y_p, attn)
        return MALState(memory, attn)

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> MALState:
        return cast_state(self._initial(batch_size, device, dtype), dtype=dtype, device=device)

    def forward(self, x: Tensor, state: MALState | None = None) -> tuple[Tensor, MALState]:
        state = state if state is not None else self._initial(x.shape[0], x.device, x.dtype)
        y, memory_state = self.memory(x, state.memory)
        o, attn_state = self._attend(y, state.attn)
        return o, MALState(memory_state, attn_state)

    def step(self, x: Tensor, state: MALState) -> tuple[Tensor, MALState]:
        y, memory_state = self.memory.step(x, state.memory)
        o, attn_state = self._attend(y, state.attn, step=True)
        return o, MALState(memory_state, attn_state)


# -- MAC -----------------------------------------------------------------------------------
class MACConfig(_HybridConfig):
    """MAC's defaults were chosen by measurement (module doc): a short conv on the attention's
    q, k, v and the memory writing the segment's tokens; the paper's eq. 24 is
    ``write: attention_output``."""

    segment_len: int = Field(64, ge=1, description="segment length C; attention is causal inside a segment")
    attn_conv_size: int | None = Field(
        4, ge=2, description="short causal depthwise conv on the q, k, v of both attention streams (x and the "
                             "read-outs h; section 4.4 puts one after every q/k/v projection); on by default "
                             "(module doc); None = plain attention")
    write: Literal["attention_output", "input"] = Field(
        "input", description="what the memory stores: the segment's tokens x (titans-pytorch's choice, the "
                             "default by measurement) or the attention outputs y (eq. 24, the paper)")

    def check(self, d_model: int) -> None:
        super().check(d_model)
        kind, memory = self.memory_config(d_model)
        if kind != "titans":
            raise ConfigError("memory.type", f"MAC reads the memory without writing, which needs the "
                                             f"'titans' memory, got {kind!r}")
        if self.segment_len % memory.chunk_size:
            raise ConfigError("memory.chunk_size", f"must divide segment_len={self.segment_len} so that "
                                                   f"memory chunks never straddle segments, got {memory.chunk_size}")


class MACState(NamedTuple):
    memory: TitansMixerState             # the memory after every attention output written so far
    segment_weights: tuple[Tensor, ...]  # M_{s-1}: its weights at the start of the current segment
    read_conv: Tensor                    # short conv of the memory's projections over the x stream
    k_cache: Tensor                      # (B, H, 2C, K) rotated keys of [h ‖ x] of the segment
    v_cache: Tensor                      # (B, H, 2C, K)
    pos: int                             # tokens seen so far
    x_conv: Tensor | None = None         # (B, 3D, attn_conv_size - 1) attention conv over x's q/k/v
    h_conv: Tensor | None = None         # (B, 3D, attn_conv_size - 1) attention conv over h's q/k/v


@register
class TitansMAC(TokenMixer):
    """Memory as a Context (Titans eq. 21-25). For each segment S of C tokens:

        h = M*_{s-1}(q(S))                         read the memory before the segment, no write
        y = Attn([P ‖ h ‖ S])                      causal, per-position mask over h
        m = M(y): the memory pass over y           writes y (eq. 24); m_t = M_t(q_t(y)), causal
                                                   (default write="input": over x instead)
        o = RMSNorm(y) ⊙ σ(RMSNorm(m))             y ⊗ M*(y), eq. 25

    The memory is the ``titans`` mixer (the same LMM as every other variant); a read-out h_j
    uses its projections and output head on x_j with the segment-start weights, and becomes a
    token of the attention. Query i sees P, h_j and x_j for j <= i of its own segment only.
    ``write="input"`` stores the segment's tokens x instead of y (titans-pytorch's choice, an
    ablation of eq. 24); ``attn_conv_size`` puts a short conv on the q/k/v of both streams.
    The memory, the segment-start weights and the segment's keys are carried across calls."""

    name = "titans_mac"
    Config = MACConfig
    backends = ("sdpa",)
    test_space = {"n_heads": [1, 2], "segment_len": [4, 16], "n_persistent": [0, 2], "attn_conv_size": [None, 3],
                  "write": ["attention_output", "input"],
                  "memory": [{"type": "titans", "n_heads": 2, "chunk_size": 2, "expansion": 2},
                             {"type": "titans", "n_heads": 1, "chunk_size": 4, "depth": 1}]}

    def __init__(self, config: MACConfig, *, d_model: int, layer_idx: int = 0) -> None:
        super().__init__(config, d_model=d_model, layer_idx=layer_idx)
        self.segment_len = config.segment_len
        self.attn = _attention(d_model, n_heads=config.n_heads, window=None, n_persistent=config.n_persistent,
                               rope_base=config.rope_base, backend=config.backend,
                               conv_size=config.attn_conv_size)
        # The read-outs h are a stream of their own: their q/k/v get their own short conv.
        self.h_conv = (ShortConv(3 * d_model, kernel_size=config.attn_conv_size, activation=None)
                       if config.attn_conv_size else None)
        self.memory: Titans = _build_memory(config, d_model, layer_idx)
        self.norm_attn = RMSNorm(d_model)
        self.norm_memory = RMSNorm(d_model)

    @property
    def backend(self) -> str:
        return self.attn.backend

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> MACState:
        memory = self.memory.init_state(batch_size, device=device, dtype=dtype)
        cache = torch.zeros(batch_size, self.attn.n_heads, 2 * self.segment_len, self.attn.head_dim,
                            device=device, dtype=dtype)
        convs = [conv.init_state(batch_size, device=device, dtype=dtype) if conv is not None else None
                 for conv in (self.attn.conv, self.h_conv)]
        return MACState(memory, memory.memory.weights, memory.conv.clone(), cache, cache.clone(), 0, *convs)

    def _segment_piece(self, x: Tensor, state: MACState) -> tuple[Tensor, MACState]:
        """Tokens at offsets off .. off+n-1 of one segment; x: (B, n, D)."""
        b, n, _ = x.shape
        c, off = self.segment_len, state.pos % self.segment_len
        # 1) read the memory as it was before the segment: h_j = M*_{s-1}(q_j), no write.
        h, read_conv = self.memory.read(x, state.segment_weights, state.read_conv)
        # 2) causal attention over [P ‖ h ‖ S]: query i sees P, h_j and x_j for j <= i.
        (q, k_x, v_x), x_conv = self.attn.project(x, off, self.attn.conv, state.x_conv)  # (B, H, n, K)
        (_, k_h, v_h), h_conv = self.attn.project(h, off, self.h_conv, state.h_conv)
        slots = torch.arange(off, off + n, device=x.device)
        k_cache = state.k_cache.index_copy(2, slots, k_h).index_copy(2, slots + c, k_x)
        v_cache = state.v_cache.index_copy(2, slots, v_h).index_copy(2, slots + c, v_x)
        seen = torch.arange(c, device=x.device)[None, :] <= slots[:, None]  # (n, C): j <= i
        mask = torch.cat([seen, seen], 1)  # (n, 2C) over [h ‖ x]
        keys, values = k_cache, v_cache
        prefix = self.attn._persistent_kv(b)
        if prefix is not None:
            keys, values = torch.cat([prefix[0], keys], 2), torch.cat([prefix[1], values], 2)
            mask = torch.cat([mask.new_ones(n, prefix[0].shape[2]), mask], 1)
        o = attend(q, keys, values, mask, backend=self.backend)
        y = self.attn.out(rearrange(o, "b h t k -> b t (h k)"))  # (B, n, D)
        # 3) write the attention outputs into the memory; its read-out is m_t = M_t(q_t(y)).
        #    (write="input": the segment's tokens instead, m_t = M_t(q_t(x)).)
        m, memory = self.memory(y if self.config.write == "attention_output" else x, state.memory)
        # 4) y ⊗ M*(y): both normalised with learnable vector weights, then a sigmoid gate.
        out = self.norm_attn(y) * torch.sigmoid(self.norm_memory(m))
        closes = off + n == c
        segment_weights = memory.memory.weights if closes else state.segment_weights
        return out, MACState(memory, segment_weights, read_conv, k_cache, v_cache, state.pos + n, x_conv, h_conv)

    def forward(self, x: Tensor, state: MACState | None = None) -> tuple[Tensor, MACState]:
        state = state if state is not None else self.default_state(x)
        outs, lo = [], 0
        while lo < x.shape[1]:
            hi = min(x.shape[1], lo + self.segment_len - state.pos % self.segment_len)
            y, state = self._segment_piece(x[:, lo:hi], state)
            outs.append(y)
            lo = hi
        return (torch.cat(outs, 1) if outs else x.new_zeros(x.shape)), state

    def step(self, x: Tensor, state: MACState) -> tuple[Tensor, MACState]:
        y, state = self._segment_piece(x[:, None], state)
        return y[:, 0], state
