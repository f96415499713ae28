"""DeltaNet / Gated DeltaNet specifics: β and decay parameterisation, initialisation,
config validation; the generic invariants (test_invariants.py) cover the contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from seqzoo import mixers
from seqzoo.mixers.base import ConfigError
from seqzoo.ops.gated_delta_rule import gated_delta_rule_recurrent
from tests.helpers import assert_close, build_mixer


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet"])
@pytest.mark.parametrize("neg", [False, True])
def test_beta_range(name, neg):
    mixer = mixers.build(name, d_model=16, n_heads=2, allow_neg_eigval=neg)
    with torch.no_grad():
        mixer.b_proj.weight.normal_(0, 0.5)
        beta = mixer._beta(torch.randn(4, 64, 16))
    hi = 2.0 if neg else 1.0
    assert beta.shape == (4, 64, 2)
    assert (beta > 0).all() and (beta < hi).all()
    assert (beta > 1).any() == neg  # only the negative-eigenvalue option reaches past 1


def test_gated_deltanet_init_follows_the_paper():
    torch.manual_seed(0)
    mixer = mixers.build("gated_deltanet", d_model=64, n_heads=64)  # many heads: a sample of the init
    a = mixer.A_log.exp()
    dt = F.softplus(mixer.dt_bias)
    assert (a >= 0).all() and (a <= 16).all() and a.max() > 8
    assert_close(dt.clamp(0.001, 0.1), dt, torch.float32, "softplus(dt_bias) must lie in [dt_min, dt_max]")
    assert dt.log().std() > 0.5  # log-uniform spread, not a constant
    assert mixer.head_v == 2 * mixer.head_k  # value dim 2x key dim by default
    g = mixer._log_decay(torch.randn(2, 8, 64))
    assert g.shape == (2, 8, 64) and (g <= 0).all()


def test_gated_deltanet_forward_is_the_gated_delta_rule():
    """The mixer's chunked forward equals the readable recurrence on its own q, k, v, g, β."""
    mixer = build_mixer("gated_deltanet", {"n_heads": 2, "chunk_size": 4, "allow_neg_eigval": True})
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    state = mixer.init_state(2, dtype=torch.float64)
    with torch.no_grad():
        y, _ = mixer(x)
        q, k, v, _ = mixer._qkv(x, state)
        o, _ = gated_delta_rule_recurrent(q, k, v, mixer._log_decay(x), mixer._beta(x))
        expected = mixer._output(o, x)
        raw = rearrange(mixer.q_conv(mixer.q_proj(x), state.conv_q)[0], "b t (h k) -> b t h k", h=2)  # before the norm
    assert_close(y, expected, torch.float64)
    # L2-normalised as the authors' release does it: x / sqrt(||x||^2 + 1e-6)
    assert_close(q, raw / torch.sqrt(raw.pow(2).sum(-1, keepdim=True) + 1e-6), torch.float64, "q's L2 norm")


def test_decay_parameters_get_gradients():
    mixer = build_mixer("gated_deltanet", {"n_heads": 2, "chunk_size": 3}).train()
    y, _ = mixer(torch.randn(1, 9, 16, dtype=torch.float64))
    y.square().sum().backward()
    for p in (mixer.A_log, mixer.dt_bias, mixer.a_proj.weight, mixer.b_proj.weight, mixer.g_proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet"])
def test_without_short_conv(name):
    mixer = build_mixer(name, {"use_short_conv": False, "n_heads": 2, "chunk_size": 3})
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    with torch.no_grad():
        y, state = mixer(x)
        y1, s1 = mixer(x[:, :4])
        y2, _ = mixer.step(x[:, 4], s1)
    assert_close(y2, y[:, 4], torch.float64)
    assert state.conv_q.shape[-1] == 0


@pytest.mark.parametrize(("name", "params", "key"), [
    ("deltanet", {"n_heads": 3}, "n_heads"),
    ("deltanet", {"head_dim": 5, "expand_v": 0.5}, "expand_v"),
    ("gated_deltanet", {"a_init_range": (4.0, 2.0)}, "a_init_range"),
    ("gated_deltanet", {"n_head": 2}, "n_head"),
])
def test_config_errors_name_the_key(name, params, key):
    with pytest.raises(ConfigError) as err:
        mixers.build(name, d_model=16, **params)
    assert err.value.key == key


def test_head_dim_overrides_width():
    mixer = mixers.build("deltanet", d_model=16, n_heads=3, head_dim=8, expand_v=1.5)
    assert (mixer.head_k, mixer.head_v) == (8, 12)
    assert mixer.state_size(1) == 3 * (8 * 12) + 3 * 3 * (8 + 8 + 12)
    y, state = mixer(torch.randn(1, 5, 16))
    assert y.shape == (1, 5, 16) and state.memory.shape == (1, 3, 8, 12)
