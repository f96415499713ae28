"""Load a mamba-ssm ``Mamba`` state_dict (``mamba_ssm/modules/mamba_simple.py``) into
seqzoo's ``mamba`` mixer. No import of mamba-ssm is needed: only tensor names and shapes.

Name map, mamba-ssm -> seqzoo (D model width, E·D = int(expand·D) inner width, N d_state,
R dt_rank, W d_conv):

    in_proj.weight   (2·E·D, D)     -> in_proj.weight       rows in the same order [x, z]
    in_proj.bias     (bias=True)    -> in_proj.bias
    conv1d.weight    (E·D, 1, W)    -> conv1d.conv.weight   depthwise, same tap order
    conv1d.bias      (E·D,)         -> conv1d.conv.bias     (absent when conv_bias=False)
    x_proj.weight    (R + 2·N, E·D) -> x_proj.weight        rows in the same order [Δ, B, C]
    dt_proj.weight   (E·D, R)       -> dt_proj.weight
    dt_proj.bias     (E·D,)         -> dt_proj.bias         b_Δ, added before the softplus
    A_log            (E·D, N)       -> A_log                A = -exp(A_log)
    D                (E·D,)         -> D
    out_proj.weight  (D, E·D)       -> out_proj.weight
    out_proj.bias    (bias=True)    -> out_proj.bias

Every hyper-parameter a forward pass needs is recorded by the shapes (d_model, expand,
d_state, dt_rank, d_conv, conv_bias, bias); the Δ initialisation range is not, and does not
matter once weights are loaded. Decode caches differ in layout: mamba-ssm's conv cache keeps
the last W conv inputs, seqzoo's the last W - 1; ``mamba_state_from_cache`` converts.
mamba-ssm has no negative-eigenvalue option: a mixer with ``allow_neg_eigval`` (transition
2·exp(ΔA) − 1) is refused with a clear error, as is the override, rather than loaded to
compute other maths than the checkpoint was trained with.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from seqzoo.interop.mamba2 import CheckpointMismatchError, refuse_neg_eigval
from seqzoo.mixers.mamba import Mamba, MambaState

__all__ = ["MAMBA_KEY_MAP", "CheckpointMismatchError", "load_mamba_state_dict", "mamba_config_from_state_dict",
           "mamba_from_state_dict", "mamba_state_from_cache"]

# mamba-ssm name -> seqzoo name
MAMBA_KEY_MAP: dict[str, str] = {
    "in_proj.weight": "in_proj.weight",
    "in_proj.bias": "in_proj.bias",
    "conv1d.weight": "conv1d.conv.weight",
    "conv1d.bias": "conv1d.conv.bias",
    "x_proj.weight": "x_proj.weight",
    "dt_proj.weight": "dt_proj.weight",
    "dt_proj.bias": "dt_proj.bias",
    "A_log": "A_log",
    "D": "D",
    "out_proj.weight": "out_proj.weight",
    "out_proj.bias": "out_proj.bias",
}
_OPTIONAL = {"in_proj.bias", "conv1d.bias", "out_proj.bias"}


def _strip(state_dict: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    if not prefix:
        return dict(state_dict)
    picked = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not picked:
        raise CheckpointMismatchError(f"no key starts with prefix {prefix!r}")
    return picked


def _require(sd: Mapping[str, Tensor], key: str, prefix: str) -> Tensor:
    if key not in sd:
        expected = sorted(k for k in MAMBA_KEY_MAP if k not in _OPTIONAL)
        raise CheckpointMismatchError(f"missing {prefix + key!r}: not a mamba-ssm Mamba state_dict "
                                      f"(expected keys {expected})")
    return sd[key]


def _shape_error(prefix: str, key: str, tensor: Tensor, expected: tuple[int, ...], why: str) -> CheckpointMismatchError:
    return CheckpointMismatchError(f"{prefix + key!r} has shape {tuple(tensor.shape)}, expected {expected} ({why})")


def _refuse_neg_eigval(enabled: bool, where: str) -> None:
    refuse_neg_eigval(enabled, where, "Mamba")


def mamba_config_from_state_dict(state_dict: Mapping[str, Tensor], *, prefix: str = "",
                                 **overrides: Any) -> tuple[int, dict[str, Any]]:
    """Infer ``(d_model, mixer kwargs)`` from the tensor shapes, checking that they agree
    with each other. ``overrides`` set fields the shapes do not record (e.g. ``scan``,
    ``chunk_size``)."""
    _refuse_neg_eigval(bool(overrides.get("allow_neg_eigval", False)), "overrides")
    sd = _strip(state_dict, prefix)
    in_w = _require(sd, "in_proj.weight", prefix)
    if in_w.dim() != 2 or in_w.shape[0] % 2:
        raise CheckpointMismatchError(f"{prefix}in_proj.weight has shape {tuple(in_w.shape)}, "
                                      f"expected (2·inner, d_model)")
    d_model, d_inner = in_w.shape[1], in_w.shape[0] // 2
    a_log = _require(sd, "A_log", prefix)
    if a_log.dim() != 2 or a_log.shape[0] != d_inner:
        raise _shape_error(prefix, "A_log", a_log, (d_inner, -1), "inner width from in_proj, d_state")
    d_state = a_log.shape[1]
    dt_w = _require(sd, "dt_proj.weight", prefix)
    if dt_w.dim() != 2 or dt_w.shape[0] != d_inner:
        raise _shape_error(prefix, "dt_proj.weight", dt_w, (d_inner, -1), "inner width, dt_rank")
    dt_rank = dt_w.shape[1]
    conv_w = _require(sd, "conv1d.weight", prefix)
    if conv_w.dim() != 3 or conv_w.shape[:2] != (d_inner, 1):
        raise _shape_error(prefix, "conv1d.weight", conv_w, (d_inner, 1, -1), "depthwise conv over the inner width")
    expected = {
        "x_proj.weight": (dt_rank + 2 * d_state, d_inner),
        "dt_proj.bias": (d_inner,),
        "D": (d_inner,),
        "out_proj.weight": (d_model, d_inner),
        "conv1d.bias": (d_inner,),
        "in_proj.bias": (2 * d_inner,),
        "out_proj.bias": (d_model,),
    }
    for key, shape in expected.items():
        tensor = sd.get(key) if key in _OPTIONAL else _require(sd, key, prefix)
        if tensor is not None and tuple(tensor.shape) != shape:
            raise _shape_error(prefix, key, tensor, shape, f"d_model={d_model}, inner={d_inner}, "
                                                           f"d_state={d_state}, dt_rank={dt_rank}")
    if ("in_proj.bias" in sd) != ("out_proj.bias" in sd):
        raise CheckpointMismatchError("only one of in_proj.bias / out_proj.bias is present; mamba-ssm's `bias` "
                                      "flag sets both")
    expand = d_inner / d_model
    if int(expand * d_model) != d_inner:
        raise CheckpointMismatchError(f"inner width {d_inner} is not int(expand * d_model) for any float expand "
                                      f"(d_model={d_model})")
    params: dict[str, Any] = dict(
        d_state=d_state, d_conv=conv_w.shape[-1], expand=expand, dt_rank=dt_rank,
        conv_bias="conv1d.bias" in sd, bias="in_proj.bias" in sd,
    )
    params.update(overrides)
    return d_model, params


def load_mamba_state_dict(mixer: Mamba, state_dict: Mapping[str, Tensor], *, prefix: str = "") -> None:
    """Copy a mamba-ssm ``Mamba`` state_dict into ``mixer`` (in place, like
    ``load_state_dict``), checking every name and shape first. ``prefix`` selects one layer
    of a full model, e.g. ``"backbone.layers.3.mixer."``."""
    _refuse_neg_eigval(mixer.config.allow_neg_eigval, "mixer")
    sd = _strip(state_dict, prefix)
    unknown = sorted(set(sd) - set(MAMBA_KEY_MAP))
    if unknown:
        raise CheckpointMismatchError(f"unexpected keys {[prefix + k for k in unknown]}: not a mamba-ssm Mamba "
                                      f"(v1) layer; expected only {sorted(MAMBA_KEY_MAP)}")
    ours = mixer.state_dict()
    mapped: dict[str, Tensor] = {}
    for theirs, mine in MAMBA_KEY_MAP.items():
        if (theirs in sd) != (mine in ours):
            if theirs not in sd and theirs not in _OPTIONAL:
                _require(sd, theirs, prefix)
            where = "checkpoint" if theirs in sd else "mixer"
            raise CheckpointMismatchError(f"{prefix + theirs!r} exists only in the {where} "
                                          f"(check bias / conv_bias of the mixer config)")
        if theirs not in sd:
            continue
        tensor = sd[theirs]
        if tuple(tensor.shape) != tuple(ours[mine].shape):
            raise CheckpointMismatchError(f"{prefix + theirs!r} has shape {tuple(tensor.shape)}, but the mixer's "
                                          f"{mine!r} has {tuple(ours[mine].shape)} (check d_model, expand, "
                                          f"d_state, dt_rank, d_conv)")
        mapped[mine] = tensor
    with torch.no_grad():
        mixer.load_state_dict(mapped, strict=True)


def mamba_from_state_dict(state_dict: Mapping[str, Tensor], *, prefix: str = "", layer_idx: int = 0,
                          **overrides: Any) -> Mamba:
    """Build a ``mamba`` mixer whose shapes are inferred from a mamba-ssm state_dict, and
    load it. The mixer takes the dtype of the checkpoint's ``in_proj.weight``."""
    from seqzoo import mixers

    d_model, params = mamba_config_from_state_dict(state_dict, prefix=prefix, **overrides)
    mixer = mixers.build("mamba", d_model=d_model, layer_idx=layer_idx, **params)
    mixer = mixer.to(_strip(state_dict, prefix)["in_proj.weight"].dtype)
    load_mamba_state_dict(mixer, state_dict, prefix=prefix)
    return mixer


def mamba_state_from_cache(conv_state: Tensor, ssm_state: Tensor) -> MambaState:
    """mamba-ssm's decode cache -> seqzoo's state. conv_state: (B, E·D, W) holds the last W
    conv inputs, of which the next step drops the oldest; seqzoo keeps those W - 1.
    ssm_state: (B, E·D, N) is the same h in both."""
    if conv_state.dim() != 3 or ssm_state.dim() != 3 or conv_state.shape[:2] != ssm_state.shape[:2]:
        raise CheckpointMismatchError(f"expected conv_state (B, E·D, W) and ssm_state (B, E·D, N), got "
                                      f"{tuple(conv_state.shape)} and {tuple(ssm_state.shape)}")
    return MambaState(conv_state[..., 1:], ssm_state)
