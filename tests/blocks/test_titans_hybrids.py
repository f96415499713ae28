"""Titans hybrids (Titans paper section 4, DESIGN.md section 4) checked against slow literal
implementations written here: MAC's order of operations (read the pre-segment memory, then
attend, then write), its per-position causal mask, the memory carried across segments and
calls, and the persistent prefix of MAG / MAL. Everything in fp64 at the 1e-9 tolerance."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from seqzoo.mixers.base import ConfigError
from seqzoo.ops.titans import init_state, memory_read
from seqzoo.ops.titans_naive import titans_memory_naive
from tests.helpers import assert_close, build_mixer

F64 = torch.float64
MEMORY = {"type": "titans", "n_heads": 2, "depth": 2, "expansion": 2, "chunk_size": 4}


def _x(b: int = 2, t: int = 13, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, t, 16, generator=torch.Generator().manual_seed(seed), dtype=F64)


# -- literal pieces of the Titans memory (the `titans` mixer's projections, spelled out) ----
def _project(mem, z: torch.Tensor):
    """q, k, v (B, T, H, K) and the gates of a whole stream z from a zero conv state:
    SiLU(conv(.)) on q, k (and on v with value_path=silu_conv, else v = z W_v), L2 q, k."""
    cfg = mem.config
    q, k, v = mem.qkv(z).chunk(3, dim=-1)  # (B, T, D) each
    mixed = torch.cat([q, k, v] if cfg.value_path == "silu_conv" else [q, k], -1)
    if mem.conv is not None:
        w = mem.conv.conv.weight  # (C, 1, k)
        padded = F.pad(rearrange(mixed, "b t c -> b c t"), (w.shape[-1] - 1, 0))
        mixed = rearrange(F.conv1d(padded, w, groups=w.shape[0]), "b c t -> b t c")
    parts = F.silu(mixed).chunk(3 if cfg.value_path == "silu_conv" else 2, dim=-1)
    q, k, v = (rearrange(a, "b t (h d) -> b t h d", h=mem.n_heads) for a in (*parts[:2], parts[2] if len(parts) == 3 else v))
    if cfg.qk_norm == "l2":
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    theta, eta, alpha = mem._gates(z)
    return q, k, v, theta, eta, alpha


def _options(mem) -> dict:
    """The memory's settings as the naive loop and memory_read take them."""
    cfg = mem.config
    ln = (mem.ln_weight, mem.ln_bias) if cfg.memory_norm == "layernorm" else None
    return dict(activation=cfg.activation, residual=cfg.residual, bias=cfg.bias, ln=ln)


def _head(mem, o: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The memory's output head: RMSNorm(o) ⊙ SiLU(z W_g), then W_o."""
    gate = rearrange(mem.gate_proj(z), "b t (h d) -> b t h d", h=mem.n_heads)
    return mem.out(rearrange(mem.norm(o, gate), "b t h d -> b t (h d)"))


def _initial_weights(mem, b: int):
    return tuple(w[None].expand(b, -1, -1, -1) for w in mem.memory)


def _softmax_attend(q, keys, values):
    """One query (B, H, K) over explicit keys/values (B, H, S, K)."""
    scores = torch.einsum("bhk,bhsk->bhs", q, keys) * q.shape[-1] ** -0.5
    return torch.einsum("bhs,bhsk->bhk", scores.softmax(-1), values)


def literal_mac(mac, x: torch.Tensor, *, write_first: bool = False) -> torch.Tensor:
    """Titans eq. 21-25 segment by segment and query by query, from the initial state (with
    the mixer's ``write`` and ``attn_conv_size``).
    ``write_first`` swaps the order (write the segment, then read): a wrong MAC, used to
    show the comparison can fail."""
    mem, attn, c = mac.memory, mac.attn, mac.segment_len
    b, t, _ = x.shape
    cfg = mem.config
    q_read = _project(mem, x)[0]
    state = init_state(_initial_weights(mem, b))
    ys, hs, outs = [], [], []
    for lo in range(0, t, c):
        seg = x[:, lo:lo + c]
        n = seg.shape[1]
        if write_first:  # wrong order: the segment's own tokens go into the memory first
            _, k, v, th, et, al = (z[:, lo:lo + n] for z in _project(mem, x))
            _, state_w = titans_memory_naive(q_read[:, lo:lo + n], k, v, th, et, al, None,
                                             chunk_size=cfg.chunk_size, initial_state=state,
                                             output_final_state=True, max_grad_norm=cfg.max_grad_norm,
                                             **_options(mem))
            weights = state_w.weights
        else:
            weights = state.weights  # M_{s-1}: the memory before this segment
        h = _head(mem, memory_read(weights, q_read[:, lo:lo + n], **_options(mem)), seg)  # (B, n, D)
        hs.append(h)
        # q/k/v of the x and h streams (each through its short conv over the whole stream so far)
        qkv_x, qkv_h = attn.qkv(x[:, :lo + n]), attn.qkv(torch.cat(hs, 1))  # (B, lo + n, 3D)
        if attn.conv is not None:
            qkv_x, qkv_h = attn.conv(qkv_x)[0], mac.h_conv(qkv_h)[0]
        qx, kx, vx = rearrange(qkv_x[:, lo:], "b t (g h k) -> g b t h k", g=3, h=attn.n_heads)
        _, kh, vh = rearrange(qkv_h[:, lo:], "b t (g h k) -> g b t h k", g=3, h=attn.n_heads)
        qx, kx, kh = attn.rotary(qx), attn.rotary(kx), attn.rotary(kh)  # positions inside the segment
        y = []
        for i in range(n):  # query i: [P ‖ h_0..h_i ‖ x_0..x_i]
            keys = [kh[:, :i + 1], kx[:, :i + 1]]
            values = [vh[:, :i + 1], vx[:, :i + 1]]
            if attn.persistent is not None:
                _, kp, vp = rearrange(attn.qkv(attn.persistent), "p (g h k) -> g p h k", g=3, h=attn.n_heads)
                keys.insert(0, kp[None].expand(b, -1, -1, -1))
                values.insert(0, vp[None].expand(b, -1, -1, -1))
            keys = rearrange(torch.cat(keys, 1), "b s h k -> b h s k")
            values = rearrange(torch.cat(values, 1), "b s h k -> b h s k")
            y.append(rearrange(_softmax_attend(qx[:, i], keys, values), "b h k -> b (h k)"))
        y = attn.out(torch.stack(y, 1))  # (B, n, D)
        ys.append(y)
        # write y (eq. 24) or, with write="input", the segment's tokens: the projections of the
        # whole written stream so far, the new segment's part
        written = torch.cat(ys, 1) if mac.config.write == "attention_output" else x[:, :lo + n]
        q, k, v, th, et, al = (z[:, lo:lo + n] for z in _project(mem, written))
        o, state = titans_memory_naive(q, k, v, th, et, al, None, chunk_size=cfg.chunk_size,
                                       initial_state=state, output_final_state=True,
                                       max_grad_norm=cfg.max_grad_norm, **_options(mem))
        m = _head(mem, o, written[:, lo:lo + n])
        outs.append(mac.norm_attn(y) * torch.sigmoid(mac.norm_memory(m)))
    return torch.cat(outs, 1)


@pytest.mark.parametrize("params", [
    dict(n_heads=2, segment_len=4, n_persistent=2, memory=MEMORY),
    # the paper's eq. 24 (the memory writes the attention outputs), with and without the conv
    dict(n_heads=2, segment_len=4, n_persistent=2, write="attention_output", attn_conv_size=None, memory=MEMORY),
    dict(n_heads=1, segment_len=6, n_persistent=1, write="attention_output", attn_conv_size=3,
         memory={**MEMORY, "chunk_size": 3}),
    dict(n_heads=1, segment_len=6, n_persistent=0, memory={**MEMORY, "chunk_size": 3, "depth": 1}),
    dict(n_heads=2, segment_len=4, n_persistent=3, memory={**MEMORY, "chunk_size": 2, "conv": False}),
    # the paper's value path, no L2 norm, a LayerNorm + residual inner model, a binding grad clip
    dict(n_heads=2, segment_len=4, n_persistent=1, memory={**MEMORY, "value_path": "silu_conv", "qk_norm": "none",
                                                           "memory_norm": "layernorm", "residual": True,
                                                           "max_grad_norm": 0.3}),
])
def test_mac_equals_literal_read_before_write(params):
    mac = build_mixer("titans_mac", params)
    x = _x(t=10)  # 3 segments, the last one partial
    with torch.no_grad():
        y, _ = mac(x)
        expected = literal_mac(mac, x)
        wrong = literal_mac(mac, x, write_first=True)
    assert_close(y, expected, F64, f"MAC {params}")
    # The first segment reads the initial memory either way; later ones must differ.
    assert (y[:, params["segment_len"]:] - wrong[:, params["segment_len"]:]).abs().max() > 1e-6


def test_mac_causal_at_every_position():
    """Per-position mask: position i sees h_j and x_j only for j <= i, inside its segment."""
    mac = build_mixer("titans_mac", dict(n_heads=2, segment_len=6, n_persistent=2,
                                        memory={**MEMORY, "chunk_size": 3}))
    x = _x(t=14)
    with torch.no_grad():
        y, _ = mac(x)
        for t in range(1, x.shape[1]):
            x2 = x.clone()
            x2[:, t] += 1.0  # one token changes
            y2, _ = mac(x2)
            assert_close(y2[:, :t], y[:, :t], F64, f"output before t={t} changed")
            assert (y2[:, t] - y[:, t]).abs().max() > 1e-6, f"token {t} does not reach its own output"


def test_mac_reads_the_pre_segment_memory_at_every_position():
    """The read-outs h_j are live: a different segment-start memory M_{s-1} changes the output
    of every position of the segment (position 0 included: it sees h_0)."""
    mac = build_mixer("titans_mac", dict(n_heads=2, segment_len=8, n_persistent=0, memory=MEMORY))
    x = _x(t=8)
    state = mac.init_state(2, device="cpu", dtype=F64)
    with torch.no_grad():
        y, _ = mac(x, state)
        other = state._replace(segment_weights=tuple(w + 0.5 for w in state.segment_weights))
        y2, _ = mac(x, other)
    assert (y2 - y).abs().amax(-1).min() > 1e-6  # every position reads the memory


def test_mac_memory_carried_across_segments_and_calls():
    mac = build_mixer("titans_mac", dict(n_heads=2, segment_len=4, n_persistent=2, memory=MEMORY))
    x = _x(t=12)
    with torch.no_grad():
        y, state = mac(x)
        # Attention never crosses a segment: segment 2 sees segment 1 only through the memory.
        x2 = x.clone()
        x2[:, :4] += 1.0
        y2, _ = mac(x2)
        assert (y2[:, 4:] - y[:, 4:]).abs().max() > 1e-6
        # Carried across calls: segment by segment == one call; a fresh state differs.
        pieces, s = [], None
        for lo in (0, 4, 8):
            out, s = mac(x[:, lo:lo + 4], s)
            pieces.append(out)
        fresh, _ = mac(x[:, 8:])
    assert_close(torch.cat(pieces, 1), y, F64)
    assert (fresh - y[:, 8:]).abs().max() > 1e-6
    initial = mac.init_state(2, device="cpu", dtype=F64)
    assert s.pos == 12 and state.pos == 12
    for a, b, w0 in zip(s.segment_weights, state.segment_weights, initial.segment_weights):
        assert_close(a, b, F64)
        assert (a - w0).abs().max() > 1e-6  # the memory learned at test time
    # At a segment boundary the segment-start weights are the memory's current weights.
    for a, b in zip(state.segment_weights, state.memory.memory.weights):
        assert torch.equal(a, b)


# -- MAG and MAL against [P ‖ x] run literally -------------------------------------------
def test_mal_equals_memory_then_swa_over_prefixed_input():
    mal = build_mixer("titans_mal", dict(n_heads=2, window=3, n_persistent=3, memory=MEMORY, residual=False))
    x = _x(t=11)
    p = mal.persistent[None].expand(2, -1, -1)
    with torch.no_grad():
        y, _ = mal(x)
        m, _ = mal.memory(torch.cat([p, x], 1))       # eq. 29-30 over [P ‖ x]
        o, _ = mal.attn(m)                            # eq. 31
    assert_close(y, o[:, 3:], F64)


def test_mal_residual_adds_the_memory_outputs_to_the_swa_over_their_norm():
    """``residual``: o = y + SW-Attn(RMSNorm(y)), y = M([P ‖ x]) (the stacked-hybrid form)."""
    mal = build_mixer("titans_mal", dict(n_heads=2, window=3, n_persistent=3, memory=MEMORY, residual=True))
    x = _x(t=11)
    p = mal.persistent[None].expand(2, -1, -1)
    with torch.no_grad():
        mal.norm_attn_input.weight.uniform_(0.5, 1.5)  # a trained-looking gain, not the identity
        y, _ = mal(x)
        m, _ = mal.memory(torch.cat([p, x], 1))
        a, _ = mal.attn(mal.norm_attn_input(m))
    assert_close(y, (m + a)[:, 3:], F64)
    assert (y - a[:, 3:]).abs().max() > 1e-3  # the memory's outputs reach the output directly


def test_mag_equals_gate_of_two_branches_over_prefixed_input():
    mag = build_mixer("titans_mag", dict(n_heads=2, window=3, n_persistent=3, memory=MEMORY))
    x = _x(t=11)
    p = mag.attn.persistent[None].expand(2, -1, -1)
    with torch.no_grad():
        y, _ = mag(x)
        m, _ = mag.memory(torch.cat([p, x], 1))      # the memory consumes [P ‖ x] (eq. 26)
        a, _ = mag.attn(x)                           # SW-Attn* with the prefix always visible
    expected = mag.norm_attn(a) * torch.sigmoid(mag.norm_memory(m[:, 3:]))
    assert_close(y, expected, F64)


def test_mag_prefix_visible_beyond_window():
    """SW-Attn* (figure 3b): the persistent tokens stay visible after they left the window."""
    mag = build_mixer("titans_mag", dict(n_heads=2, window=2, n_persistent=2, memory=MEMORY))
    x = _x(t=9)
    with torch.no_grad():
        a, _ = mag.attn(x)
        mag.attn.persistent.add_(1.0)
        a2, _ = mag.attn(x)
    assert (a2[:, -1] - a[:, -1]).abs().max() > 1e-6  # position 8 with window 2: only P explains it


# -- bad settings: errors name the key -------------------------------------------------------
@pytest.mark.parametrize("name, params, key", [
    ("titans_mac", dict(segment_len=6, memory={"type": "titans", "chunk_size": 4}), "memory.chunk_size"),
    ("titans_mac", dict(memory={"type": "gated_deltanet"}), "memory.type"),
    ("titans_mac", dict(n_heads=3), "n_heads"),
    ("titans_mag", dict(memory={"type": "titans", "chunk": 4}), "memory.chunk"),
    ("titans_mag", dict(memory={"type": "titanz"}), "memory.type"),
    ("titans_mal", dict(memory={"n_heads": 2}), "memory.type"),
    ("titans_mal", dict(memory={"type": "titans_mag"}), "memory.type"),
    ("titans_mal", dict(memory={"type": "titans", "n_heads": 3}), "memory.n_heads"),
    ("titans_mag", dict(window=0), "window"),
    ("titans_mac", dict(segment_len=0), "segment_len"),
])
def test_bad_settings_name_the_key(name, params, key):
    from seqzoo import mixers

    with pytest.raises(ConfigError) as err:
        mixers.build(name, d_model=16, **params)
    assert err.value.key == key, str(err.value)


def test_bad_hybrid_recipe_names_the_entry_and_key():
    import seqzoo
    from seqzoo.errors import RecipeError

    recipe = {"name": "bad", "model": {"d_model": 32, "n_layers": 2, "pattern": ["mac", "swa"], "mixers": {
        "mac": {"type": "titans_mac", "n_heads": 2, "segment_len": 10,
                "memory": {"type": "titans", "n_heads": 2, "chunk_size": 4}},
        "swa": {"type": "attention", "n_heads": 2, "window": 8}}},
        "task": {"type": "bytes", "seq_len": 32}}
    with pytest.raises(RecipeError, match=r"model\.mixers\.mac\.memory\.chunk_size: must divide segment_len=10"):
        seqzoo.recipe_from_dict(recipe)
    recipe["model"]["pattern"] = ["mac", "sw"]
    recipe["model"]["mixers"]["mac"]["segment_len"] = 8
    with pytest.raises(RecipeError, match=r"model\.pattern\[1\]: 'sw' is not an entry"):
        seqzoo.recipe_from_dict(recipe)


def test_any_pattern_mixes_registered_mixers():
    """Mamba2 + Gated DeltaNet + SWA + a Titans hybrid in one model, from a pattern."""
    import seqzoo

    recipe = {"name": "mix", "model": {"d_model": 32, "n_layers": 5, "mixers": {
        "ssd": {"type": "mamba2", "headdim": 16, "d_state": 8, "chunk_size": 4},
        "gdn": {"type": "gated_deltanet", "n_heads": 2, "chunk_size": 4},
        "swa": {"type": "attention", "n_heads": 2, "window": 4},
        "mag": {"type": "titans_mag", "n_heads": 2, "window": 4, "n_persistent": 2,
                "memory": {"type": "titans", "n_heads": 2, "chunk_size": 4, "expansion": 2}}},
        "pattern": ["ssd", "gdn", "swa", "mag"]}, "task": {"type": "bytes", "seq_len": 32}}
    torch.manual_seed(0)
    model = seqzoo.build_model(recipe).double().eval()
    assert [b.mixer.name for b in model.blocks] == ["mamba2", "gated_deltanet", "attention", "titans_mag", "mamba2"]
    tokens = torch.randint(0, model.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, _ = model(tokens)
        logits, state = model(tokens[:, :3])
        steps = [logits]
        for t in range(3, 10):
            step, state = model.step(tokens[:, t], state)
            steps.append(step[:, None])
    assert_close(torch.cat(steps, 1), full, F64)
