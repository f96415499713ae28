"""Load a mamba-ssm ``Mamba2`` state_dict (``mamba_ssm/modules/mamba2.py``) into seqzoo's
``mamba2`` mixer. No import of mamba-ssm is needed: only tensor names and shapes.

Name map, mamba-ssm -> seqzoo (H heads, P headdim, G groups, N d_state, E·D = H·P inner
width, W conv width, D model width):

    in_proj.weight   (2·E·D + 2·G·N + H, D)  -> in_proj.weight     rows in the same order [z, x, B, C, dt]
    in_proj.bias     (optional, bias=True)   -> in_proj.bias
    conv1d.weight    (E·D + 2·G·N, 1, W)     -> conv.conv.weight   channels [x, B, C]
    conv1d.bias      (E·D + 2·G·N,)          -> conv.conv.bias     (absent when conv_bias=False)
    dt_bias          (H,)                    -> dt_bias
    A_log            (H,)                    -> A_log
    D                (H,) or (E·D,)          -> D                  (E·D,) when D_has_hdim=True
    norm.weight      (E·D,)                  -> norm.weight        RMSNormGated, group size E·D/G
    out_proj.weight  (D, E·D)                -> out_proj.weight
    out_proj.bias    (optional)              -> out_proj.bias

A state_dict does not record ``ngroups`` (B and C only show the product G·N), nor
``dt_limit``, the norm's eps or ``chunk_size``: pass them (``n_groups=...`` and any other
``Mamba2Config`` field as keyword overrides). Not representable in seqzoo's mixer, and
refused with a clear error: ``d_ssm < d_inner`` (extra gated-MLP channels in in_proj),
``rmsnorm=False`` (no ``norm.weight``), learnable initial states, and a mixer (or an
override) with ``allow_neg_eigval`` (mamba-ssm's transition is exp(ΔA), never
2·exp(ΔA) − 1). The decode caches differ in layout too (mamba-ssm keeps W conv inputs, seqzoo W - 1), so caches are not converted.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from seqzoo.mixers.mamba2 import Mamba2

# mamba-ssm name -> seqzoo name
MAMBA2_KEY_MAP: dict[str, str] = {
    "in_proj.weight": "in_proj.weight",
    "in_proj.bias": "in_proj.bias",
    "conv1d.weight": "conv.conv.weight",
    "conv1d.bias": "conv.conv.bias",
    "dt_bias": "dt_bias",
    "A_log": "A_log",
    "D": "D",
    "norm.weight": "norm.weight",
    "out_proj.weight": "out_proj.weight",
    "out_proj.bias": "out_proj.bias",
}


class CheckpointMismatchError(ValueError):
    """A state_dict that does not fit the mixer (names, shapes or an unsupported variant)."""


def _strip(state_dict: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    if not prefix:
        return dict(state_dict)
    picked = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not picked:
        raise CheckpointMismatchError(f"no key starts with prefix {prefix!r}")
    return picked


def _require(sd: Mapping[str, Tensor], key: str, prefix: str) -> Tensor:
    if key not in sd:
        raise CheckpointMismatchError(
            f"missing {prefix + key!r}: not a mamba-ssm Mamba2 state_dict (expected keys "
            f"{sorted(k for k in MAMBA2_KEY_MAP if not k.endswith('bias') or k == 'dt_bias')})")
    return sd[key]


def refuse_neg_eigval(enabled: bool, where: str, model: str = "Mamba2") -> None:
    """mamba-ssm's ``Mamba`` / ``Mamba2`` (and transformers' ports) compute the transition
    exp(ΔA) only: their weights in a mixer with ``allow_neg_eigval`` (2·exp(ΔA) − 1) would run
    other maths."""
    if enabled:
        raise CheckpointMismatchError(f"{where}: allow_neg_eigval=True has no counterpart in mamba-ssm's {model} "
                                      f"(its transition is exp(ΔA), never negative); a {model} checkpoint "
                                      f"loads only into a mixer with allow_neg_eigval=False")


def _refuse_neg_eigval(enabled: bool, where: str) -> None:
    refuse_neg_eigval(enabled, where, "Mamba2")


def mamba2_config_from_state_dict(state_dict: Mapping[str, Tensor], *, n_groups: int = 1,
                                  prefix: str = "", **overrides: Any) -> tuple[int, dict[str, Any]]:
    """Infer ``(d_model, mixer kwargs)`` from the tensor shapes; ``n_groups`` and the fields
    a state_dict does not record come from the caller."""
    _refuse_neg_eigval(bool(overrides.get("allow_neg_eigval", False)), "overrides")
    sd = _strip(state_dict, prefix)
    in_w = _require(sd, "in_proj.weight", prefix)
    out_w = _require(sd, "out_proj.weight", prefix)
    conv_w = _require(sd, "conv1d.weight", prefix)
    a_log = _require(sd, "A_log", prefix)
    d_skip = _require(sd, "D", prefix)
    if "norm.weight" not in sd:
        raise CheckpointMismatchError("no 'norm.weight': Mamba2(rmsnorm=False) is not supported by seqzoo's mamba2")
    d_model, d_inner, n_heads = in_w.shape[1], out_w.shape[1], a_log.shape[0]
    d_ssm = sd["norm.weight"].shape[0]
    if d_ssm != d_inner:
        raise CheckpointMismatchError(f"norm.weight has {d_ssm} channels but out_proj reads {d_inner}: a Mamba2 "
                                      f"with d_ssm < d_inner (gated-MLP channels) is not supported")
    if d_inner % d_model:
        raise CheckpointMismatchError(f"out_proj.weight {tuple(out_w.shape)}: inner width {d_inner} is not a "
                                      f"multiple of d_model={d_model}")
    if d_inner % n_heads:
        raise CheckpointMismatchError(f"A_log has {n_heads} heads, which does not divide the inner width {d_inner}")
    conv_dim = conv_w.shape[0]
    two_gn = conv_dim - d_inner
    if two_gn <= 0 or two_gn % (2 * n_groups):
        raise CheckpointMismatchError(
            f"conv1d.weight has {conv_dim} channels = inner width {d_inner} + 2·G·N; "
            f"that is not divisible by 2·n_groups with n_groups={n_groups}")
    expected_rows = d_inner + conv_dim + n_heads
    if in_w.shape[0] != expected_rows:
        extra = in_w.shape[0] - expected_rows
        hint = (f"{extra} extra rows: a Mamba2 with d_ssm < d_inner (gated-MLP channels), not supported"
                if extra > 0 else "fewer rows than [z, x, B, C, dt] needs")
        raise CheckpointMismatchError(f"in_proj.weight has {in_w.shape[0]} rows, expected {expected_rows} "
                                      f"(2·{d_inner} + {two_gn} + {n_heads}): {hint}")
    headdim = d_inner // n_heads
    if d_skip.shape not in ((n_heads,), (d_inner,)):
        raise CheckpointMismatchError(f"D has shape {tuple(d_skip.shape)}, expected ({n_heads},) or ({d_inner},)")
    params: dict[str, Any] = dict(
        d_state=two_gn // (2 * n_groups), d_conv=conv_w.shape[-1], expand=d_inner // d_model,
        headdim=headdim, n_groups=n_groups,
        skip_per_channel=d_skip.shape == (d_inner,) and d_inner != n_heads,
        conv_bias="conv1d.bias" in sd, bias="in_proj.bias" in sd,
    )
    params.update(overrides)
    return d_model, params


def load_mamba2_state_dict(mixer: Mamba2, state_dict: Mapping[str, Tensor], *, prefix: str = "") -> None:
    """Copy a mamba-ssm ``Mamba2`` state_dict into ``mixer`` (in place, like
    ``load_state_dict``), checking every name and shape first. ``prefix`` selects one layer
    of a full model, e.g. ``"backbone.layers.3.mixer."``."""
    _refuse_neg_eigval(mixer.config.allow_neg_eigval, "mixer")
    sd = _strip(state_dict, prefix)
    unknown = sorted(set(sd) - set(MAMBA2_KEY_MAP))
    if unknown:
        raise CheckpointMismatchError(f"unexpected keys {[prefix + k for k in unknown]} (e.g. learnable initial "
                                      f"states or a newer Mamba2 variant): not supported")
    ours = mixer.state_dict()
    mapped: dict[str, Tensor] = {}
    for theirs, mine in MAMBA2_KEY_MAP.items():
        if (theirs in sd) != (mine in ours):
            where = "checkpoint" if theirs in sd else "mixer"
            raise CheckpointMismatchError(f"{prefix + theirs!r} exists only in the {where} "
                                          f"(check bias / conv_bias of the mixer config)")
        if theirs not in sd:
            continue
        tensor = sd[theirs]
        if tuple(tensor.shape) != tuple(ours[mine].shape):
            raise CheckpointMismatchError(f"{prefix + theirs!r} has shape {tuple(tensor.shape)}, but the mixer's "
                                          f"{mine!r} has {tuple(ours[mine].shape)} (check d_model, expand, headdim, "
                                          f"n_groups, d_state, d_conv, skip_per_channel)")
        mapped[mine] = tensor
    with torch.no_grad():
        mixer.load_state_dict(mapped, strict=True)


def mamba2_from_state_dict(state_dict: Mapping[str, Tensor], *, n_groups: int = 1, prefix: str = "",
                           layer_idx: int = 0, **overrides: Any) -> Mamba2:
    """Build a ``mamba2`` mixer whose shapes are inferred from a mamba-ssm state_dict, and
    load it. The mixer takes the dtype of the checkpoint's ``in_proj.weight``."""
    from seqzoo import mixers

    d_model, params = mamba2_config_from_state_dict(state_dict, n_groups=n_groups, prefix=prefix, **overrides)
    mixer = mixers.build("mamba2", d_model=d_model, layer_idx=layer_idx, **params)
    mixer = mixer.to(_strip(state_dict, prefix)["in_proj.weight"].dtype)
    load_mamba2_state_dict(mixer, state_dict, prefix=prefix)
    return mixer
