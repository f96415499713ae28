"""Mamba2-specific checks: the paper's initialisation, parameter shapes as mamba-ssm, config
errors, and the whole mixer against an independent per-token forward written here from the
paper's equations (also used by the checkpoint-interop test)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from seqzoo import mixers
from seqzoo.mixers.base import ConfigError
from seqzoo.mixers.mamba2 import Mamba2State
from tests.helpers import assert_close, build_mixer, scan_steps


def mamba2_reference(raw: dict[str, torch.Tensor], u: torch.Tensor, *, headdim: int, ngroups: int,
                     d_state: int, eps: float = 1e-5, neg_eigval: bool = False) -> torch.Tensor:
    """Mamba2 block from raw tensors named as mamba-ssm's ``Mamba2`` (in_proj.weight,
    conv1d.weight/bias, dt_bias, A_log, D, norm.weight, out_proj.weight), one token and one
    head at a time. u: (B, T, D) -> (B, T, D). ``neg_eigval``: transition 2·exp(dt A) − 1
    (Grazzi et al. 2024) instead of exp(dt A)."""
    b, t, _ = u.shape
    nheads = raw["A_log"].shape[0]
    d_inner = nheads * headdim
    gn = ngroups * d_state
    zxbcdt = u @ raw["in_proj.weight"].T
    if "in_proj.bias" in raw:
        zxbcdt = zxbcdt + raw["in_proj.bias"]
    z = zxbcdt[..., :d_inner]
    xbc = zxbcdt[..., d_inner:2 * d_inner + 2 * gn]
    dt_raw = zxbcdt[..., 2 * d_inner + 2 * gn:]
    w = raw["conv1d.weight"][:, 0]  # (channels, width)
    width = w.shape[1]
    padded = F.pad(xbc, (0, 0, width - 1, 0))  # zeros before the first token
    conv = torch.stack([(padded[:, i:i + width] * w.T).sum(1) for i in range(t)], 1)
    xbc = F.silu(conv + raw["conv1d.bias"])
    x, Bm, Cm = xbc[..., :d_inner], xbc[..., d_inner:d_inner + gn], xbc[..., d_inner + gn:]
    dt = F.softplus(dt_raw + raw["dt_bias"])
    A = -torch.exp(raw["A_log"])
    D = raw["D"]
    heads_per_group = nheads // ngroups
    y = torch.zeros(b, t, d_inner, dtype=u.dtype)
    for h in range(nheads):
        g = h // heads_per_group
        cols = slice(h * headdim, (h + 1) * headdim)
        state = torch.zeros(b, headdim, d_state, dtype=u.dtype)
        for i in range(t):
            Bt = Bm[:, i, g * d_state:(g + 1) * d_state]
            Ct = Cm[:, i, g * d_state:(g + 1) * d_state]
            xt = x[:, i, cols]
            decay = torch.exp(dt[:, i, h] * A[h])
            decay = 2 * decay - 1 if neg_eigval else decay
            state = decay[:, None, None] * state \
                + dt[:, i, h, None, None] * xt[:, :, None] * Bt[:, None, :]
            skip = D[cols] if D.numel() == d_inner else D[h]
            y[:, i, cols] = (state * Ct[:, None, :]).sum(-1) + skip * xt
    gated = y * F.silu(z)
    group = d_inner // ngroups
    normed = torch.cat([
        gated[..., k * group:(k + 1) * group]
        / torch.sqrt(gated[..., k * group:(k + 1) * group].pow(2).mean(-1, keepdim=True) + eps)
        for k in range(ngroups)], -1) * raw["norm.weight"]
    out = normed @ raw["out_proj.weight"].T
    if "out_proj.bias" in raw:
        out = out + raw["out_proj.bias"]
    return out


def raw_from_mixer(m) -> dict[str, torch.Tensor]:
    """The mixer's parameters under mamba-ssm's names, mapped by hand (independent of interop)."""
    raw = {
        "in_proj.weight": m.in_proj.weight, "conv1d.weight": m.conv.conv.weight,
        "conv1d.bias": m.conv.conv.bias, "dt_bias": m.dt_bias, "A_log": m.A_log, "D": m.D,
        "norm.weight": m.norm.weight, "out_proj.weight": m.out_proj.weight,
    }
    if m.in_proj.bias is not None:
        raw["in_proj.bias"], raw["out_proj.bias"] = m.in_proj.bias, m.out_proj.bias
    return {k: v.detach() for k, v in raw.items()}


@given(headdim=st.sampled_from([4, 8]), ngroups=st.sampled_from([1, 2]), chunk=st.sampled_from([2, 5]),
       per_channel=st.booleans(), bias=st.booleans(), t=st.integers(1, 9), seed=st.integers(0, 999))
def test_forward_matches_the_papers_equations(headdim, ngroups, chunk, per_channel, bias, t, seed):
    params = dict(headdim=headdim, n_groups=ngroups, d_state=4, chunk_size=chunk,
                  skip_per_channel=per_channel, bias=bias)
    m = build_mixer("mamba2", params, seed=seed)
    u = torch.randn(2, t, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y, _ = m(u)
    expected = mamba2_reference(raw_from_mixer(m), u, headdim=headdim, ngroups=ngroups, d_state=4)
    assert_close(y, expected, torch.float64, f"{params}")


def test_parameter_names_and_shapes_follow_mamba_ssm():
    d, e, p, g, n, k = 32, 2, 8, 2, 6, 4
    m = mixers.build("mamba2", d_model=d, headdim=p, n_groups=g, d_state=n)
    h, d_inner = e * d // p, e * d
    shapes = {name: tuple(t.shape) for name, t in m.state_dict().items()}
    assert shapes == {
        "in_proj.weight": (2 * d_inner + 2 * g * n + h, d),
        "conv.conv.weight": (d_inner + 2 * g * n, 1, k),
        "conv.conv.bias": (d_inner + 2 * g * n,),
        "dt_bias": (h,), "A_log": (h,), "D": (h,),
        "norm.weight": (d_inner,),
        "out_proj.weight": (d, d_inner),
    }
    state = m.init_state(3, device="cpu", dtype=torch.float32)
    assert isinstance(state, Mamba2State)
    assert state.conv.shape == (3, d_inner + 2 * g * n, k - 1) and state.ssm.shape == (3, h, p, n)


def test_initialisation_follows_the_paper():
    torch.manual_seed(0)
    m = mixers.build("mamba2", d_model=256, headdim=2)  # 256 heads: enough draws for ranges
    dt = F.softplus(m.dt_bias.detach().double())
    assert dt.min() >= 0.001 * (1 - 1e-6) and dt.max() <= 0.1 * (1 + 1e-6)
    # log-uniform: the median of log dt sits near the middle of [log 1e-3, log 1e-1]
    assert abs(dt.log().median().item() - 0.5 * (math.log(1e-3) + math.log(1e-1))) < 0.5
    A = -torch.exp(m.A_log.detach())
    assert A.min() >= -16 and A.max() <= -1 and A.std() > 2  # spread over U(1, 16)
    assert torch.equal(m.D.detach(), torch.ones(256)) and torch.equal(m.norm.weight.detach(), torch.ones(512))
    # the floor: with dt_min below it, every dt is at least the floor
    floored = mixers.build("mamba2", d_model=64, headdim=2, dt_min=1e-6, dt_max=2e-6, dt_init_floor=1e-4)
    assert torch.allclose(F.softplus(floored.dt_bias.detach().double()), torch.full((64,), 1e-4, dtype=torch.float64))


def test_dt_limit_clamps_the_step():
    m = build_mixer("mamba2", dict(headdim=8, d_state=4, dt_limit=(0.5, 0.6)))
    dt, _, _ = m._ssm_params(torch.randn(3, m.n_heads, dtype=torch.float64) * 5)
    assert dt.min() >= 0.5 and dt.max() <= 0.6


@pytest.mark.parametrize("params, key", [
    (dict(headdim=5), "headdim"),
    (dict(headdim=8, n_groups=3), "n_groups"),
    (dict(d_stat=4), "d_stat"),
])
def test_config_errors_name_the_key(params, key):
    with pytest.raises(ConfigError) as err:
        mixers.build("mamba2", d_model=16, **params)
    assert err.value.key == key


def test_bad_ranges_are_rejected():
    with pytest.raises(ConfigError):
        mixers.build("mamba2", d_model=16, dt_min=0.2, dt_max=0.1)
    with pytest.raises(ConfigError):
        mixers.build("mamba2", d_model=16, A_init_range=(0.0, 4.0))


def test_bf16_runs_close_to_fp32():
    m32 = build_mixer("mamba2", dict(headdim=8, d_state=8, chunk_size=8), dtype=torch.float32)
    m16 = build_mixer("mamba2", dict(headdim=8, d_state=8, chunk_size=8), dtype=torch.float32).to(torch.bfloat16)
    u = torch.randn(2, 30, 16)
    with torch.no_grad():
        y32, _ = m32(u)
        y16, s16 = m16(u.bfloat16())
    assert y16.dtype == torch.bfloat16 and s16.ssm.dtype == torch.bfloat16
    assert ((y16.float() - y32).norm() / y32.norm()) < 5e-2


# -- negative eigenvalues (Grazzi et al. 2024): transition 2·exp(dt A) − 1 ------------------
def neg_mamba2(**params):
    """A neg-eig mixer with large steps (dt_bias 3: transitions near −1), except head 0:
    its dt row of in_proj and dt_bias zeroed, so dt = softplus(0) = log 2 exactly, and
    A = −1 (A_log = 0): a transition 2·exp(−log 2) − 1 of exactly 0 at every token."""
    params = {"headdim": 4, "n_groups": 2, "d_state": 4, "chunk_size": 3, "allow_neg_eigval": True, **params}
    m = build_mixer("mamba2", params)
    with torch.no_grad():
        m.dt_bias.fill_(3.0)
        m.dt_bias[0] = 0.0
        m.in_proj.weight[m.d_inner + m.conv_dim] = 0.0  # head 0's dt row
        m.A_log[0] = 0.0
    return m


def test_neg_eigval_transition_is_two_exp_minus_one():
    """Zero input, zero conv bias: x, B, C are 0 and dt = softplus(dt_bias), so one step maps
    the state h to (2·exp(dt A) − 1) h; large dt flips its sign, dt = log 2 with A = −1 zeroes it."""
    for neg in (True, False):
        m = neg_mamba2(allow_neg_eigval=neg)
        with torch.no_grad():
            m.conv.conv.bias.zero_()
        h0 = torch.rand(2, m.n_heads, m.headdim, m.d_state, dtype=torch.float64) + 0.5
        state = m.init_state(2, dtype=torch.float64)._replace(ssm=h0)
        x = torch.zeros(2, 16, dtype=torch.float64)
        with torch.no_grad():
            _, s_step = m.step(x, state)
            _, s_fwd = m(x[:, None], state)
        decay = torch.exp(F.softplus(m.dt_bias) * -torch.exp(m.A_log)).detach()[:, None, None]  # (H, 1, 1)
        expected = ((2 * decay - 1) if neg else decay) * h0
        assert_close(s_step.ssm, expected, torch.float64)
        assert_close(s_fwd.ssm, expected, torch.float64)
        if neg:
            assert torch.equal(s_step.ssm[:, 0], torch.zeros_like(h0[:, 0]))  # exactly 0
            assert (s_step.ssm[:, 1:] < 0).all()  # an eigenvalue < 0: the state flips
        else:
            assert (s_step.ssm > 0).all()


@pytest.mark.parametrize("chunk", [1, 3, 8, 64])
def test_neg_eigval_chunked_decode_chaining_and_the_papers_equations_agree(chunk):
    m = neg_mamba2(chunk_size=chunk)
    x = torch.randn(2, 19, 16, dtype=torch.float64)
    with torch.no_grad():
        y, s = m(x)
        y_steps, s_steps = scan_steps(m, x, m.init_state(2, dtype=torch.float64))
        y1, s1 = m(x[:, :7])
        y2, s2 = m(x[:, 7:], s1)
    expected = mamba2_reference(raw_from_mixer(m), x, headdim=4, ngroups=2, d_state=4, neg_eigval=True)
    assert_close(y, expected, torch.float64, "chunked vs the paper's equations")
    assert_close(y_steps, y, torch.float64, "decode")
    assert_close(s_steps.ssm, s.ssm, torch.float64, "decode state")
    assert_close(torch.cat([y1, y2], 1), y, torch.float64, "chained")
    assert_close(s2.ssm, s.ssm, torch.float64, "chained state")
    plain = mamba2_reference(raw_from_mixer(m), x, headdim=4, ngroups=2, d_state=4)
    assert not torch.allclose(plain, y)  # the option changes the maths


@pytest.mark.parametrize("chunk", [1, 4])
def test_neg_eigval_gradients_chunked_equal_decode(chunk):
    x = torch.randn(1, 11, 16, dtype=torch.float64)
    w = torch.randn(1, 11, 16, dtype=torch.float64)
    grads = []
    for run in ("forward", "decode"):
        m = neg_mamba2(chunk_size=chunk)
        xs = x.clone().requires_grad_()
        y = m(xs)[0] if run == "forward" else scan_steps(m, xs, m.init_state(1, dtype=torch.float64))[0]
        (y * w).sum().backward()
        grads.append({"x": xs.grad, **{n: p.grad for n, p in m.named_parameters()}})
    for name, g in grads[1].items():
        assert g is not None and torch.isfinite(grads[0][name]).all(), name
        assert_close(grads[0][name], g, torch.float64, name)


def test_neg_eigval_kernels_are_skipped_by_auto_and_refused_by_name(monkeypatch):
    from seqzoo import kernels
    from seqzoo.kernels import resolve_backend

    monkeypatch.setattr(kernels, "_importable", lambda module: True)  # resolution only, no kernel runs
    m = mixers.build("mamba2", d_model=16, headdim=8, d_state=4, allow_neg_eigval=True)
    cuda = torch.device("cuda")
    for backend in m.backends:
        assert "negative eigenvalues" in m.kernel_limits(backend)
        with pytest.raises(ConfigError, match="cannot compute this configuration.*negative eigenvalues"):
            resolve_backend(backend, m.backends, cuda, dtype=torch.float32, limits=m.kernel_limits)
    assert resolve_backend("auto", m.backends, cuda, dtype=torch.float32, limits=m.kernel_limits) == "reference"
    with pytest.raises(ConfigError, match="backend"):  # on CPU a named kernel is refused as well
        mixers.build("mamba2", d_model=16, headdim=8, d_state=4, allow_neg_eigval=True, backend="fla").backend
