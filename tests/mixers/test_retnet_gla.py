"""RetNet and GLA mixers against independent, written-out readings of their papers (the
generic invariants already prove forward == step == chaining), plus config validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seqzoo import mixers
from seqzoo.mixers.base import ConfigError
from tests.helpers import assert_close, build_mixer


def per_head_layer_norm(o: torch.Tensor, norm: torch.nn.GroupNorm) -> torch.Tensor:
    """o: (B, T, H, V): normalise each head's V features (mean / variance), then affine."""
    mean = o.mean(-1, keepdim=True)
    var = o.var(-1, unbiased=False, keepdim=True)
    y = ((o - mean) / torch.sqrt(var + norm.eps)).flatten(2)  # (B, T, H*V)
    return y * norm.weight + norm.bias


def rotate(x: torch.Tensor, base: float) -> torch.Tensor:
    """Half-split rotary of x: (B, T, H, K) at positions 0 .. T-1, in complex arithmetic."""
    k = x.shape[-1]
    freqs = base ** (-torch.arange(0, k, 2, dtype=torch.float64) / k)  # (K/2,)
    phase = torch.polar(torch.ones(x.shape[1], k // 2, dtype=torch.float64),
                        torch.arange(x.shape[1], dtype=torch.float64)[:, None] * freqs)  # (T, K/2)
    z = torch.complex(x[..., : k // 2], x[..., k // 2:]) * phase[None, :, None, :]
    return torch.cat([z.real, z.imag], -1)


@pytest.mark.parametrize("n_heads", [1, 2, 4])
def test_retnet_is_msr_of_the_paper(n_heads):
    mixer = build_mixer("retnet", {"n_heads": n_heads, "chunk_size": 4})
    x = torch.randn(2, 13, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    hk = 16 // n_heads
    split = lambda z: z.unflatten(-1, (n_heads, -1))  # noqa: E731  (B, T, H, *)
    q = rotate(split(x @ mixer.q_proj.weight.T), 10000.0)
    k = rotate(split(x @ mixer.k_proj.weight.T), 10000.0)
    v = split(x @ mixer.v_proj.weight.T)
    # Parallel retention (paper eq. 5) with D_nm = gamma_h^(n-m), gamma_h = 1 - 2^(-5-h).
    n = torch.arange(13, dtype=torch.float64)
    heads = []
    for h in range(n_heads):
        gamma = 1 - 2.0 ** (-5 - h)
        decay = torch.where(n[:, None] >= n[None, :], gamma ** (n[:, None] - n[None, :]), 0.0)  # (T, T)
        scores = torch.einsum("btk,bsk->bts", q[:, :, h], k[:, :, h]) * hk ** -0.5 * decay
        heads.append(scores @ v[:, :, h])
    y = per_head_layer_norm(torch.stack(heads, 2), mixer.norm)  # GroupNorm, one group per head
    expected = (F.silu(x @ mixer.g_proj.weight.T) * y) @ mixer.out.weight.T  # (swish(X W_G) ⊙ Y) W_O
    with torch.no_grad():
        actual, _ = mixer(x)
    assert_close(actual, expected, torch.float64)


@pytest.mark.parametrize("params", [{"n_heads": 2}, {"n_heads": 4, "expand_k": 1.0, "gate_temperature": 4.0}])
def test_gla_is_the_layer_of_the_paper(params):
    mixer = build_mixer("gla", {**params, "chunk_size": 5})
    x = torch.randn(2, 11, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    h, tau = params["n_heads"], params.get("gate_temperature", 16.0)
    split = lambda z: z.unflatten(-1, (h, -1))  # noqa: E731  (B, T, H, *)
    q, k, v = (split(x @ lin.weight.T) for lin in (mixer.q_proj, mixer.k_proj, mixer.v_proj))
    # alpha_t = sigmoid(x W_a1 W_a2 + b)^(1/tau), in probability space (the op gets its log).
    logits = x @ mixer.gate_down.weight.T @ mixer.gate_up.weight.T + mixer.gate_up.bias
    alpha = split(torch.sigmoid(logits) ** (1 / tau))
    state = torch.zeros(2, h, q.shape[-1], v.shape[-1], dtype=torch.float64)
    outs = []
    for t in range(11):  # S_t = Diag(alpha_t) S_{t-1} + k_t^T v_t, o_t = q_t S_t / sqrt(K)
        state = alpha[:, t, :, :, None] * state + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * q.shape[-1] ** -0.5, state))
    y = per_head_layer_norm(torch.stack(outs, 1), mixer.norm)
    r = F.silu(x @ mixer.r_proj.weight.T + mixer.r_proj.bias)  # r_t = swish(x W_r + b_r)
    expected = (r * y) @ mixer.out.weight.T
    with torch.no_grad():
        actual, _ = mixer(x)
    assert_close(actual, expected, torch.float64)


def test_paper_widths_by_default():
    retnet = mixers.build("retnet", d_model=32)
    assert retnet.v_proj.out_features == 64 and retnet.g_proj.out_features == 64  # value dim 2d
    gla = mixers.build("gla", d_model=32)
    assert gla.q_proj.out_features == 16 and gla.v_proj.out_features == 32  # keys d/2, values d
    assert gla.gate_down.out_features == 16 and gla.config.gate_temperature == 16.0


@pytest.mark.parametrize("name, params, key", [
    ("retnet", {"n_heads": 3}, "n_heads"),            # 16 not divisible by 3
    ("retnet", {"n_heads": 16}, "n_heads"),           # head dim 1: odd, no rotary
    ("retnet", {"expand_v": 1.1}, "expand_v"),
    ("gla", {"n_heads": 16}, "expand_k"),             # key width 8 < 16 heads
    ("gla", {"expand_v": 0.3}, "expand_v"),
    ("gla", {"gate_rank": 4}, "gate_rank"),           # typo: unknown key
    ("gla", {"chunk_size": 0}, "chunk_size"),
])
def test_bad_config_names_the_key(name, params, key):
    with pytest.raises(ConfigError) as err:
        mixers.build(name, d_model=16, **params)
    assert err.value.key == key
