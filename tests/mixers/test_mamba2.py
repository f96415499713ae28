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
from tests.helpers import assert_close, build_mixer


def mamba2_reference(raw: dict[str, torch.Tensor], u: torch.Tensor, *, headdim: int, ngroups: int,
                     d_state: int, eps: float = 1e-5) -> torch.Tensor:
    """Mamba2 block from raw tensors named as mamba-ssm's ``Mamba2`` (in_proj.weight,
    conv1d.weight/bias, dt_bias, A_log, D, norm.weight, out_proj.weight), one token and one
    head at a time. u: (B, T, D) -> (B, T, D)."""
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
            state = torch.exp(dt[:, i, h] * A[h])[:, None, None] * state \
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
