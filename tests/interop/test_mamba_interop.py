"""Loading a mamba-ssm ``Mamba`` state_dict (names and shapes as mamba-ssm builds them,
random values) into seqzoo's mixer reproduces a forward computed here from the raw tensors,
following mamba-ssm's non-fused path (conv1d with padding W-1, x_proj split [Δ, B, C],
dt_proj weight then softplus(· + bias), per-token scan, D skip, SiLU(z) gate, out_proj)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from seqzoo import mixers
from seqzoo.interop.mamba import (
    CheckpointMismatchError,
    load_mamba_state_dict,
    mamba_config_from_state_dict,
    mamba_from_state_dict,
    mamba_state_from_cache,
)
from tests.helpers import assert_close, scan_steps


def mamba_ssm_state_dict(*, d_model=24, expand=2, d_state=5, d_conv=4, dt_rank=None,
                         bias=False, conv_bias=True, seed=0) -> dict[str, torch.Tensor]:
    """What ``mamba_ssm.modules.mamba_simple.Mamba(...).state_dict()`` holds, filled with
    random values of a plausible scale."""
    g = torch.Generator().manual_seed(seed)
    d_inner = int(expand * d_model)
    rank = dt_rank or math.ceil(d_model / 16)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    sd = {
        "in_proj.weight": rnd(2 * d_inner, d_model, scale=d_model ** -0.5),
        "conv1d.weight": rnd(d_inner, 1, d_conv, scale=0.5),
        "x_proj.weight": rnd(rank + 2 * d_state, d_inner, scale=d_inner ** -0.5),
        "dt_proj.weight": rnd(d_inner, rank, scale=rank ** -0.5),
        "dt_proj.bias": rnd(d_inner) - 3.0,
        "A_log": torch.log(1 + 15 * torch.rand(d_inner, d_state, generator=g, dtype=torch.float64)),
        "D": 1 + rnd(d_inner, scale=0.1),
        "out_proj.weight": rnd(d_model, d_inner, scale=d_inner ** -0.5),
    }
    if conv_bias:
        sd["conv1d.bias"] = rnd(d_inner, scale=0.1)
    if bias:
        sd["in_proj.bias"] = rnd(2 * d_inner, scale=0.1)
        sd["out_proj.bias"] = rnd(d_model, scale=0.1)
    return sd


def raw_forward(sd, u, *, d_state, h0=None, conv_cache=None):
    """mamba-ssm's slow path from the raw tensors; also returns its decode cache
    (conv_state: the last W conv inputs, ssm_state: h_T)."""
    b, length, _ = u.shape
    xz = u @ sd["in_proj.weight"].T + (sd["in_proj.bias"] if "in_proj.bias" in sd else 0)
    x, z = xz.transpose(1, 2).chunk(2, dim=1)  # (B, E·D, T) each
    d_inner, _, width = sd["conv1d.weight"].shape
    if conv_cache is not None:  # continue after a cached prefix: prepend its last W-1 inputs
        x_in = torch.cat([conv_cache[..., 1:], x], -1)
        xc = F.conv1d(x_in, sd["conv1d.weight"], sd.get("conv1d.bias"), groups=d_inner)
    else:
        xc = F.conv1d(x, sd["conv1d.weight"], sd.get("conv1d.bias"), padding=width - 1, groups=d_inner)[..., :length]
    new_cache = F.pad(x, (width - length, 0)) if conv_cache is None else torch.cat([conv_cache, x], -1)[..., -width:]
    xc = F.silu(xc)
    rank = sd["dt_proj.weight"].shape[1]
    dbc = xc.transpose(1, 2) @ sd["x_proj.weight"].T  # (B, T, R + 2N)
    dt, Bm, Cm = dbc.split([rank, d_state, d_state], dim=-1)
    delta = F.softplus(dt @ sd["dt_proj.weight"].T + sd["dt_proj.bias"])  # (B, T, E·D)
    A = -torch.exp(sd["A_log"])
    h = torch.zeros(b, d_inner, d_state, dtype=u.dtype) if h0 is None else h0
    ys = []
    for t in range(length):
        h = torch.exp(delta[:, t, :, None] * A) * h + delta[:, t, :, None] * Bm[:, t, None, :] * xc[:, :, t, None]
        ys.append((h * Cm[:, t, None, :]).sum(-1) + sd["D"] * xc[:, :, t])
    y = torch.stack(ys, 1) * F.silu(z.transpose(1, 2))  # (B, T, E·D)
    out = y @ sd["out_proj.weight"].T + (sd["out_proj.bias"] if "out_proj.bias" in sd else 0)
    return out, new_cache, h


@pytest.mark.parametrize("kw", [
    dict(),
    dict(d_model=20, expand=1.5, d_state=3, dt_rank=4, d_conv=3, bias=True),
    dict(d_model=16, d_state=1, conv_bias=False),
], ids=["default", "bias-rank4-conv3", "no-conv-bias"])
@pytest.mark.parametrize("scan", ["chunked", "sequential"])
def test_loaded_mixer_reproduces_the_raw_forward(kw, scan):
    sd = mamba_ssm_state_dict(**kw)
    mixer = mamba_from_state_dict(sd, scan=scan, chunk_size=4)
    assert mixer.A_log.dtype == torch.float64  # the checkpoint's dtype: no rounding on the way
    assert mixer.d_state == kw.get("d_state", 5)
    u = torch.randn(2, 11, kw.get("d_model", 24), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y, state = mixer(u)
    y_raw, _, h_raw = raw_forward(sd, u, d_state=mixer.d_state)
    assert_close(y, y_raw, torch.float64, f"{kw}")
    assert_close(state.ssm, h_raw, torch.float64, "final SSM state")


def test_decode_continues_from_a_converted_mamba_ssm_cache():
    sd = mamba_ssm_state_dict(seed=3)
    mixer = mamba_from_state_dict(sd)
    g = torch.Generator().manual_seed(4)
    prefix, rest = (torch.randn(1, n, 24, dtype=torch.float64, generator=g) for n in (6, 3))
    _, conv_cache, h = raw_forward(sd, prefix, d_state=5)
    y_rest, _, _ = raw_forward(sd, rest, d_state=5, h0=h, conv_cache=conv_cache)
    with torch.no_grad():
        y_steps, _ = scan_steps(mixer, rest, mamba_state_from_cache(conv_cache, h))
    assert_close(y_steps, y_rest, torch.float64)


def test_load_into_an_existing_mixer_with_a_model_prefix():
    sd = mamba_ssm_state_dict(seed=2)
    full = {f"backbone.layers.3.mixer.{k}": v for k, v in sd.items()}
    full["backbone.layers.3.norm.weight"] = torch.ones(24)  # other modules are ignored
    mixer = mixers.build("mamba", d_model=24, d_state=5).double()
    load_mamba_state_dict(mixer, full, prefix="backbone.layers.3.mixer.")
    assert torch.equal(mixer.conv1d.conv.weight, sd["conv1d.weight"])
    assert torch.equal(mixer.A_log, sd["A_log"])
    u = torch.randn(1, 5, 24, dtype=torch.float64)
    with torch.no_grad():
        y, _ = mixer(u)
    assert_close(y, raw_forward(sd, u, d_state=5)[0], torch.float64)


def test_config_is_inferred_from_shapes():
    d_model, params = mamba_config_from_state_dict(mamba_ssm_state_dict(d_model=20, expand=1.5, d_state=3,
                                                                        dt_rank=4, d_conv=3, bias=True))
    assert d_model == 20
    assert params == dict(d_state=3, d_conv=3, expand=1.5, dt_rank=4, conv_bias=True, bias=True)


def test_mismatches_raise_clear_errors():
    sd = mamba_ssm_state_dict()
    with pytest.raises(CheckpointMismatchError, match="missing 'x_proj.weight'"):
        mamba_from_state_dict({k: v for k, v in sd.items() if k != "x_proj.weight"})
    with pytest.raises(CheckpointMismatchError, match="'x_proj.weight' has shape"):
        mamba_from_state_dict({**sd, "x_proj.weight": sd["x_proj.weight"][:-1]})
    with pytest.raises(CheckpointMismatchError, match="'D' has shape"):
        mamba_from_state_dict({**sd, "D": sd["D"][:-1]})
    with pytest.raises(CheckpointMismatchError, match="unexpected keys"):
        mamba_from_state_dict({**sd, "norm.weight": torch.ones(48)})  # a Mamba2 key
    with pytest.raises(CheckpointMismatchError, match="prefix"):
        mamba_from_state_dict(sd, prefix="backbone.")
    # an existing mixer of the wrong size or with the wrong bias flags
    with pytest.raises(CheckpointMismatchError, match="'x_proj.weight' has shape .* d_state"):
        load_mamba_state_dict(mixers.build("mamba", d_model=24, d_state=4), sd)
    with pytest.raises(CheckpointMismatchError, match="conv1d.bias' exists only in the checkpoint"):
        load_mamba_state_dict(mixers.build("mamba", d_model=24, d_state=5, conv_bias=False), sd)
    with pytest.raises(CheckpointMismatchError, match="in_proj.bias' exists only in the mixer"):
        load_mamba_state_dict(mixers.build("mamba", d_model=24, d_state=5, bias=True), sd)
    with pytest.raises(CheckpointMismatchError, match="conv_state"):
        mamba_state_from_cache(torch.zeros(1, 48, 4), torch.zeros(1, 47, 5))


def test_a_negative_eigenvalue_mixer_is_refused():
    """mamba-ssm's Mamba has no allow_neg_eigval: its weights must not silently run 2·exp(ΔA) − 1."""
    sd = mamba_ssm_state_dict()
    with pytest.raises(CheckpointMismatchError, match="allow_neg_eigval"):
        mamba_from_state_dict(sd, allow_neg_eigval=True)
    with pytest.raises(CheckpointMismatchError, match="allow_neg_eigval"):
        mamba_config_from_state_dict(sd, allow_neg_eigval=True)
    mixer = mixers.build("mamba", d_model=24, d_state=5, allow_neg_eigval=True).double()
    before = mixer.in_proj.weight.clone()
    with pytest.raises(CheckpointMismatchError, match="exp\\(ΔA\\)"):
        load_mamba_state_dict(mixer, sd)
    assert torch.equal(mixer.in_proj.weight, before)  # nothing was copied
    assert mamba_from_state_dict(sd, allow_neg_eigval=False).config.allow_neg_eigval is False
