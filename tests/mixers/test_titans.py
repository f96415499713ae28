"""Titans- and TTT-mixer specifics beyond the generic invariants: the ablation switches,
config errors, the read modes and what the outer loop learns (long-stream stability:
test_titans_stability.py)."""

from __future__ import annotations

import pytest
import torch

from seqzoo import mixers
from seqzoo.mixers.base import ConfigError
from seqzoo.ops.titans import memory_read
from tests.helpers import assert_close, build_mixer


def test_ablation_switches():
    base = build_mixer("titans", {"chunk_size": 4})
    linear = build_mixer("titans", {"linear_memory": True, "chunk_size": 4})
    assert len(base.memory) == 2 and len(linear.memory) == 1
    no_conv = build_mixer("titans", {"conv": False})
    assert no_conv.conv is None
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    for key in ("momentum", "forgetting"):
        mixer = build_mixer("titans", {key: False})
        theta, eta, alpha = mixer._gates(x)
        assert torch.equal(eta if key == "momentum" else alpha, torch.zeros_like(theta))
        assert (theta > 0).all()
    # without momentum the state's momentum is just the last step: S_t = -theta_t u_t
    mixer = build_mixer("titans", {"momentum": False, "chunk_size": 1})
    with torch.no_grad():
        _, s1 = mixer(x[:, :8])
        _, s2 = mixer(x[:, 8:], s1)
        _, s_fresh = mixer(x[:, 8:], s1._replace(memory=s1.memory._replace(
            momentum=tuple(torch.zeros_like(m) for m in s1.memory.momentum))))
    for a, b in zip(s2.memory.weights, s_fresh.memory.weights):
        assert_close(a, b, torch.float64)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="depth"):
        mixers.build("titans", d_model=16, linear_memory=True, depth=3)
    with pytest.raises(ConfigError, match="activation"):
        mixers.build("titans", d_model=16, activation="tanh")
    with pytest.raises(ConfigError, match="n_heads"):
        mixers.build("titans", d_model=16, n_heads=3)
    with pytest.raises(ConfigError, match="read"):
        mixers.build("titans", d_model=16, read="chunk")


def test_read_modes_differ_and_chunk_start_lags():
    """read="chunk_start" reads the weights of the chunk start: the first chunk reads M_0."""
    x = torch.randn(1, 8, 16, dtype=torch.float64)
    token = build_mixer("titans", {"chunk_size": 4})
    lag = build_mixer("titans", {"chunk_size": 4, "read": "chunk_start"})
    lag.load_state_dict(token.state_dict())
    with torch.no_grad():
        y_token, _ = token(x)
        y_lag, _ = lag(x)
        # the first chunk of the lagged read uses the untrained memory, as memory_read does
        state = lag.init_state(1, dtype=torch.float64)
        q = lag.project(x, state.conv)[0]
        m0 = memory_read(state.memory, q, **lag._memory_options())
        expected = lag._output(m0, x)
    assert_close(y_lag[:, :4], expected[:, :4], torch.float64)
    assert not torch.allclose(y_lag[:, 4:], expected[:, 4:])
    assert not torch.allclose(y_token, y_lag)


def test_outer_loop_learns_initial_memory_and_gates():
    mixer = build_mixer("titans", {"chunk_size": 3}).train()
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    y, _ = mixer(x)
    y.square().sum().backward()
    for name in ("memory.0", "memory.1", "gates.weight", "gates.bias", "qkv.weight"):
        grad = dict(mixer.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
