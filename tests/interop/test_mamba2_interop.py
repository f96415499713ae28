"""Loading a mamba-ssm ``Mamba2`` state_dict (names and shapes as mamba-ssm builds them,
random values) into seqzoo's mixer reproduces a forward computed here from the raw tensors."""

from __future__ import annotations

import math

import pytest
import torch

from seqzoo import mixers
from seqzoo.interop.mamba2 import (
    CheckpointMismatchError,
    load_mamba2_state_dict,
    mamba2_config_from_state_dict,
    mamba2_from_state_dict,
)
from tests.helpers import assert_close
from tests.mixers.test_mamba2 import mamba2_reference


def mamba_ssm_state_dict(*, d_model=16, expand=2, headdim=8, ngroups=2, d_state=4, d_conv=4,
                         D_has_hdim=False, bias=False, conv_bias=True, d_ssm=None,
                         seed=0) -> dict[str, torch.Tensor]:
    """What ``mamba_ssm.modules.mamba2.Mamba2(...).state_dict()`` holds (rmsnorm=True),
    filled with random values of a plausible scale."""
    g = torch.Generator().manual_seed(seed)
    d_inner = expand * d_model
    d_ssm = d_ssm or d_inner
    nheads = d_ssm // headdim
    conv_dim = d_ssm + 2 * ngroups * d_state

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    sd = {
        "in_proj.weight": rnd(2 * d_inner + 2 * ngroups * d_state + nheads, d_model, scale=d_model ** -0.5),
        "conv1d.weight": rnd(conv_dim, 1, d_conv, scale=0.5),
        "dt_bias": rnd(nheads) - 3.0,
        "A_log": torch.log(1 + 15 * torch.rand(nheads, generator=g, dtype=torch.float64)),
        "D": 1 + rnd(d_ssm if D_has_hdim else nheads, scale=0.1),
        "norm.weight": 1 + rnd(d_ssm, scale=0.1),
        "out_proj.weight": rnd(d_model, d_inner, scale=d_inner ** -0.5),
    }
    if conv_bias:
        sd["conv1d.bias"] = rnd(conv_dim, scale=0.1)
    if bias:
        sd["in_proj.bias"] = rnd(sd["in_proj.weight"].shape[0], scale=0.1)
        sd["out_proj.bias"] = rnd(d_model, scale=0.1)
    return sd


@pytest.mark.parametrize("kw", [
    dict(),
    dict(ngroups=1, headdim=4, D_has_hdim=True),
    dict(ngroups=4, headdim=4, d_state=3, bias=True, d_conv=3),
], ids=["groups2", "hdim-D", "bias-groups4"])
def test_loaded_mixer_reproduces_the_raw_forward(kw):
    sd = mamba_ssm_state_dict(**kw)
    ngroups, headdim, d_state = kw.get("ngroups", 2), kw.get("headdim", 8), kw.get("d_state", 4)
    mixer = mamba2_from_state_dict(sd, n_groups=ngroups, chunk_size=3)
    assert mixer.A_log.dtype == torch.float64  # the checkpoint's dtype: no rounding on the way
    assert (mixer.n_heads, mixer.headdim, mixer.d_state, mixer.n_groups) == (32 // headdim, headdim, d_state, ngroups)
    u = torch.randn(2, 11, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y, _ = mixer(u)
    assert_close(y, mamba2_reference(sd, u, headdim=headdim, ngroups=ngroups, d_state=d_state),
                 torch.float64, f"{kw}")


def test_load_into_an_existing_mixer_with_a_model_prefix():
    sd = mamba_ssm_state_dict(seed=2)
    full = {f"backbone.layers.3.mixer.{k}": v for k, v in sd.items()}
    full["backbone.embedding.weight"] = torch.zeros(10, 16)  # other layers are ignored
    mixer = mixers.build("mamba2", d_model=16, headdim=8, n_groups=2, d_state=4).double()
    load_mamba2_state_dict(mixer, full, prefix="backbone.layers.3.mixer.")
    assert torch.equal(mixer.conv.conv.weight, sd["conv1d.weight"])
    assert torch.equal(mixer.in_proj.weight, sd["in_proj.weight"])
    u = torch.randn(1, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        assert_close(mixer(u)[0], mamba2_reference(sd, u, headdim=8, ngroups=2, d_state=4), torch.float64)


def test_config_inference_and_overrides():
    d_model, params = mamba2_config_from_state_dict(mamba_ssm_state_dict(D_has_hdim=True), n_groups=2,
                                                    dt_limit=(0.0, math.inf), chunk_size=16)
    assert d_model == 16
    assert params == dict(d_state=4, d_conv=4, expand=2, headdim=8, n_groups=2, skip_per_channel=True,
                          conv_bias=True, bias=False, dt_limit=(0.0, math.inf), chunk_size=16)


def test_shape_mismatch_names_the_key_and_both_shapes():
    mixer = mixers.build("mamba2", d_model=16, headdim=8, n_groups=1, d_state=6)
    with pytest.raises(CheckpointMismatchError, match=r"'in_proj.weight' has shape \(84, 16\).*\(80, 16\)"):
        load_mamba2_state_dict(mixer, mamba_ssm_state_dict(d_state=4))


def test_missing_and_unexpected_keys_are_errors():
    sd = mamba_ssm_state_dict()
    with pytest.raises(CheckpointMismatchError, match="missing 'A_log'"):
        mamba2_from_state_dict({k: v for k, v in sd.items() if k != "A_log"}, n_groups=2)
    with pytest.raises(CheckpointMismatchError, match="unexpected keys"):
        mamba2_from_state_dict({**sd, "init_states": torch.zeros(4, 8, 4)}, n_groups=2)
    with pytest.raises(CheckpointMismatchError, match="rmsnorm=False"):
        mamba2_from_state_dict({k: v for k, v in sd.items() if k != "norm.weight"}, n_groups=2)
    mixer = mixers.build("mamba2", d_model=16, headdim=8, n_groups=2, d_state=4, conv_bias=False)
    with pytest.raises(CheckpointMismatchError, match="conv1d.bias' exists only in the checkpoint"):
        load_mamba2_state_dict(mixer, sd)
    with pytest.raises(CheckpointMismatchError, match="prefix"):
        load_mamba2_state_dict(mixer, sd, prefix="backbone.")


def test_unsupported_variants_are_refused():
    with pytest.raises(CheckpointMismatchError, match="d_ssm < d_inner"):
        mamba2_from_state_dict(mamba_ssm_state_dict(d_ssm=16), n_groups=2)
    sd = mamba_ssm_state_dict()
    with pytest.raises(CheckpointMismatchError, match="n_groups=3"):
        mamba2_from_state_dict(sd, n_groups=3)
    short = {**sd, "in_proj.weight": sd["in_proj.weight"][:-1]}
    with pytest.raises(CheckpointMismatchError, match="in_proj.weight has 83 rows, expected 84"):
        mamba2_from_state_dict(short, n_groups=2)


def test_a_negative_eigenvalue_mixer_is_refused():
    """mamba-ssm's Mamba2 has no allow_neg_eigval: its weights must not silently run 2·exp(ΔA) − 1."""
    sd = mamba_ssm_state_dict()
    with pytest.raises(CheckpointMismatchError, match="allow_neg_eigval"):
        mamba2_from_state_dict(sd, n_groups=2, allow_neg_eigval=True)
    with pytest.raises(CheckpointMismatchError, match="allow_neg_eigval"):
        mamba2_config_from_state_dict(sd, n_groups=2, allow_neg_eigval=True)
    mixer = mixers.build("mamba2", d_model=16, headdim=8, n_groups=2, d_state=4, allow_neg_eigval=True).double()
    before = mixer.in_proj.weight.clone()
    with pytest.raises(CheckpointMismatchError, match="exp\\(ΔA\\)"):
        load_mamba2_state_dict(mixer, sd)
    assert torch.equal(mixer.in_proj.weight, before)  # nothing was copied
