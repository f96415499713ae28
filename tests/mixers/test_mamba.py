"""Mamba-specific checks: the paper's (and mamba-ssm's) parameterisation and initialisation,
chunked == sequential scan inside the mixer (values and gradients), config validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from seqzoo import mixers
from seqzoo.mixers.base import ConfigError
from tests.helpers import assert_close, build_mixer, scan_steps


def test_parameter_shapes_follow_mamba_ssm():
    m = mixers.build("mamba", d_model=40, d_state=8)
    d_inner, rank = 80, math.ceil(40 / 16)  # expand 2, dt_rank "auto"
    shapes = {name: tuple(p.shape) for name, p in m.named_parameters()}
    assert shapes == {
        "in_proj.weight": (2 * d_inner, 40),
        "conv1d.conv.weight": (d_inner, 1, 4),
        "conv1d.conv.bias": (d_inner,),
        "x_proj.weight": (rank + 2 * 8, d_inner),
        "dt_proj.weight": (d_inner, rank),
        "dt_proj.bias": (d_inner,),
        "A_log": (d_inner, 8),
        "D": (d_inner,),
        "out_proj.weight": (40, d_inner),
    }


def test_initialisation_follows_the_paper():
    torch.manual_seed(0)
    m = mixers.build("mamba", d_model=64, d_state=16, dt_min=0.002, dt_max=0.05)
    # S4D-real: A = -(1..N) for every channel, D = 1.
    assert torch.equal(m.A_log, torch.log(torch.arange(1.0, 17.0)).expand(128, 16))
    assert torch.equal(m.D, torch.ones(128))
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 0.002 * (1 - 1e-5) and dt.max() <= 0.05 * (1 + 1e-5)
    # log-uniform: the mean of log dt sits mid-way between the log bounds
    assert abs(dt.log().mean().item() - (math.log(0.002) + math.log(0.05)) / 2) < 0.3
    bound = m.dt_rank ** -0.5
    assert m.dt_proj.weight.abs().max() <= bound and m.dt_proj.weight.abs().max() > bound / 2
    assert not any(getattr(p, "_no_weight_decay", False) for p in (m.in_proj.weight, m.dt_proj.weight))
    assert m.A_log._no_weight_decay and m.D._no_weight_decay


def test_dt_floor_and_constant_init():
    m = mixers.build("mamba", d_model=16, dt_min=1e-6, dt_max=1e-5, dt_init_floor=1e-4,
                     dt_init="constant", dt_scale=2.0, dt_rank=4)
    assert_close(F.softplus(m.dt_proj.bias.double()), torch.full((32,), 1e-4, dtype=torch.float64),
                 torch.float32)
    assert torch.equal(m.dt_proj.weight, torch.full((32, 4), 2.0 * 4 ** -0.5))


@pytest.mark.parametrize("params", [dict(d_state=3, chunk_size=4), dict(d_state=1, expand=1.5, chunk_size=None)])
def test_chunked_and_sequential_mixers_agree_with_gradients(params):
    chunked = build_mixer("mamba", {**params, "scan": "chunked"})
    sequential = build_mixer("mamba", {**params, "scan": "sequential"})
    sequential.load_state_dict(chunked.state_dict())
    x = torch.randn(2, 23, 16, dtype=torch.float64)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    (y1, s1), (y2, s2) = chunked(xs[0]), sequential(xs[1])
    assert_close(y1, y2)
    assert_close(s1.ssm, s2.ssm)
    w = torch.randn_like(y1)
    (y1 * w).sum().backward()
    (y2 * w).sum().backward()
    assert_close(xs[0].grad, xs[1].grad)
    for (name, p1), p2 in zip(chunked.named_parameters(), sequential.parameters()):
        assert_close(p1.grad, p2.grad, msg=name)


def test_bfloat16_keeps_an_fp32_ssm_state():
    m = build_mixer("mamba", {"chunk_size": 4}, dtype=torch.float32).to(torch.bfloat16)
    x = torch.randn(1, 9, 16).bfloat16()
    y, state = m(x)
    assert y.dtype == torch.bfloat16 and state.ssm.dtype == torch.float32
    assert torch.isfinite(y.float()).all()
    y_steps, _ = scan_steps(m, x, m.init_state(1, dtype=torch.bfloat16))
    assert y_steps.dtype == torch.bfloat16
    torch.testing.assert_close(y_steps.float(), y.float(), rtol=0.05, atol=0.02)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="dt_min"):
        mixers.build("mamba", d_model=16, dt_min=0.5, dt_max=0.1)
    with pytest.raises(ConfigError, match="d_sate"):
        mixers.build("mamba", d_model=16, d_sate=4)
    with pytest.raises(ConfigError, match="expand"):
        mixers.build("mamba", d_model=16, expand=0.01)
    with pytest.raises(ConfigError, match="scan"):
        mixers.build("mamba", d_model=16, scan="parallel")
    with pytest.raises(ConfigError, match="dt_rank"):
        mixers.build("mamba", d_model=16, dt_rank=0)


def test_backend_is_reference_on_cpu_and_the_kernel_is_refused_there():
    m = mixers.build("mamba", d_model=16)
    assert m.backends == ("mamba_ssm+causal_conv1d", "mamba_ssm") and m.backend == "reference"
    with pytest.raises(ConfigError, match="backend"):
        mixers.build("mamba", d_model=16, backend="mamba_ssm").backend


# -- negative eigenvalues (Grazzi et al. 2024): transition 2·exp(ΔA) − 1 -------------------
def neg_mamba(scan: str = "auto", **params):
    """A neg-eig mixer whose Δ is large (bias 3: many transitions near −1) except channel 0:
    Δ = softplus(0) = log 2 exactly (dt_proj row and bias zeroed) with A = −1 (A_log = 0),
    a transition 2·exp(−log 2) − 1 of exactly 0 at every token."""
    m = build_mixer("mamba", {"d_state": 3, "allow_neg_eigval": True, "scan": scan, **params})
    with torch.no_grad():
        m.dt_proj.bias.fill_(3.0)
        m.dt_proj.bias[0] = 0.0
        m.dt_proj.weight[0] = 0.0
        m.A_log[0] = 0.0
    return m


def test_neg_eigval_transition_is_two_exp_minus_one():
    """Zero input and zero conv bias: the conv output, hence Δ·B·x, is 0 and Δ = softplus(b_Δ),
    so one step maps h to (2·exp(ΔA) − 1) ⊙ h; large Δ flips its sign, Δ = log 2, A = −1 zeroes it."""
    for neg in (True, False):
        m = neg_mamba()
        m.config = m.config.model_copy(update={"allow_neg_eigval": neg})
        with torch.no_grad():
            m.conv1d.conv.bias.zero_()
        state = m.init_state(2, dtype=torch.float64)
        h0 = torch.rand(2, m.d_inner, 3, dtype=torch.float64) + 0.5
        state = state._replace(ssm=h0)
        x = torch.zeros(2, 16, dtype=torch.float64)
        with torch.no_grad():
            _, s_step = m.step(x, state)
            _, s_fwd = m(x[:, None], state)
        decay = torch.exp(F.softplus(m.dt_proj.bias)[:, None] * -torch.exp(m.A_log)).detach()  # (E·D, N)
        expected = ((2 * decay - 1) if neg else decay) * h0
        assert_close(s_step.ssm, expected)
        assert_close(s_fwd.ssm, expected)
        if neg:
            assert torch.equal(s_step.ssm[:, 0], torch.zeros_like(h0[:, 0]))  # exactly 0
            assert (s_step.ssm[:, 1:] < 0).all()  # Δ ≈ 3, A ≤ −1: every eigenvalue < 0, the state flips
        else:
            assert (s_step.ssm > 0).all()


@pytest.mark.parametrize("params", [dict(), dict(expand=1, d_conv=2, chunk_size=3)])
def test_neg_eigval_scans_chaining_and_decode_agree(params):
    x = torch.randn(2, 30, 16, dtype=torch.float64)  # >= 24 tokens: "auto" would pick the chunked form
    outs = {}
    for scan in ("auto", "chunked", "sequential"):
        with torch.no_grad():
            outs[scan] = neg_mamba(scan, **params)(x)
    y_ref, s_ref = outs["sequential"]
    for scan, (y, s) in outs.items():
        assert_close(y, y_ref, msg=scan)
        assert_close(s.ssm, s_ref.ssm, msg=scan)
    m = neg_mamba("chunked", **params)
    with torch.no_grad():
        y_steps, s_steps = scan_steps(m, x, m.init_state(2, dtype=torch.float64))
        y1, s1 = m(x[:, :11])
        y2, s2 = m(x[:, 11:], s1)
    assert_close(y_steps, y_ref, msg="decode")
    assert_close(s_steps.ssm, s_ref.ssm, msg="decode state")
    assert_close(torch.cat([y1, y2], 1), y_ref, msg="chained")
    assert_close(s2.ssm, s_ref.ssm, msg="chained state")
    # the option changes the maths: the same weights without it give another output
    plain = neg_mamba("chunked", **params)
    plain.config = plain.config.model_copy(update={"allow_neg_eigval": False})
    with torch.no_grad():
        assert not torch.allclose(plain(x)[0], y_ref)


def test_neg_eigval_gradients_forward_equal_decode():
    x = torch.randn(1, 26, 16, dtype=torch.float64)
    w = torch.randn(1, 26, 16, dtype=torch.float64)
    grads = []
    for run in ("forward", "decode"):
        m = neg_mamba("chunked")
        xs = x.clone().requires_grad_()
        y = m(xs)[0] if run == "forward" else scan_steps(m, xs, m.init_state(1, dtype=torch.float64))[0]
        (y * w).sum().backward()
        grads.append({"x": xs.grad, **{n: p.grad for n, p in m.named_parameters()}})
    for name, g in grads[1].items():
        assert g is not None and torch.isfinite(grads[0][name]).all(), name
        assert_close(grads[0][name], g, msg=name)


def test_neg_eigval_kernels_are_skipped_by_auto_and_refused_by_name(monkeypatch):
    from seqzoo import kernels
    from seqzoo.kernels import resolve_backend

    monkeypatch.setattr(kernels, "_importable", lambda module: True)  # resolution only, no kernel runs
    m = mixers.build("mamba", d_model=16, allow_neg_eigval=True)
    cuda = torch.device("cuda")
    for backend in m.backends:
        assert "negative eigenvalues" in m.kernel_limits(backend)
    assert resolve_backend("auto", m.backends, cuda, dtype=torch.float32, limits=m.kernel_limits) == "reference"
    with pytest.raises(ConfigError, match="cannot compute this configuration.*negative eigenvalues"):
        resolve_backend("mamba_ssm", m.backends, cuda, dtype=torch.float32, limits=m.kernel_limits)
    plain = mixers.build("mamba", d_model=16)
    assert resolve_backend("auto", plain.backends, cuda, dtype=torch.float32,
                           limits=plain.kernel_limits) == "mamba_ssm+causal_conv1d"
