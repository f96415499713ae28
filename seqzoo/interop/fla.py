"""Loading flash-linear-attention weights: one layer (``fla.layers``: GatedDeltaNet,
DeltaNet, GatedLinearAttention, MultiScaleRetention) into the seqzoo mixer that computes the
same function, or a whole causal LM (``fla.models``: ``*ForCausalLM`` of those layers) into
a seqzoo ``LanguageModel``. No fla import is needed: names, shapes and the config only.

The shapes give the widths and heads; what they do not record comes from fla's config
(the layer's keyword arguments, or the model's ``config.json``): ``allow_neg_eigval``,
``norm_eps``, GLA's ``gate_logit_normalizer``. Settings seqzoo's mixers do not implement
(grouped value heads, conv biases, GLA/RetNet short convs or feature maps, DeltaNet's
non-L2 q/k norms, GLA's ``clamp_min``, a hybrid with attention layers) are refused by
name. The mapped mixers:

    gated_deltanet  <- GatedDeltaNet      names as seqzoo's; {q,k,v}_conv1d -> {q,k,v}_conv.conv
    deltanet        <- DeltaNet           same; fla's L2 norm of q, k and β = σ(x w_β) are seqzoo's
    gla             <- GatedLinearAttention  output_norm "rms"; g_proj -> r_proj (fla's has no bias:
                                          loaded as 0), gk_proj.{0,1} -> gate_{down,up}
    retnet          <- MultiScaleRetention   output_norm "rms"; expand_k must be 1 (seqzoo's key width)

fla's models wrap each layer as x + attn(attn_norm(x)), then x + mlp(mlp_norm(x)) with a
SwiGLU MLP (gate_proj, up_proj, down_proj), a final ``model.norm`` and ``lm_head``: seqzoo's
pre-norm block. Tested against the real fla layers and models (their Triton kernels run on
CPU in Triton's interpreter).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from seqzoo.errors import CheckpointError
from seqzoo.interop.files import read_model, read_weights, take
from seqzoo.interop.lm import BlockKeys, build_language_model, load_non_mixer_weights, refuse_unplaced

# fla model_type (config.json) -> seqzoo mixer
MODEL_TYPES = {"gated_deltanet": "gated_deltanet", "delta_net": "deltanet", "gla": "gla", "retnet": "retnet"}
FLA_MODEL_KEYS = BlockKeys(embed="model.embeddings.weight", mixer_norm="model.layers.{i}.attn_norm.weight",
                           final_norm="model.norm.weight", mlp_norm="model.layers.{i}.mlp_norm.weight",
                           mlp_gate="model.layers.{i}.mlp.gate_proj.weight",
                           mlp_up="model.layers.{i}.mlp.up_proj.weight",
                           mlp_down="model.layers.{i}.mlp.down_proj.weight")


class _Layer:
    """One fla layer's tensors (prefix stripped), its config and where they came from."""

    def __init__(self, tensors: Mapping[str, Tensor], config: Mapping[str, Any], where: str, prefix: str) -> None:
        self.t = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not self.t:
            raise CheckpointError(where, f"no tensor starts with {prefix!r}", key=prefix)
        self.config, self.where, self.prefix = config, where, prefix

    def get(self, key: str) -> Tensor:
        return take(self.t, key, self.where if not self.prefix else f"{self.where} [{self.prefix}]")

    def refuse(self, key: str, why: str) -> CheckpointError:
        return CheckpointError(self.where, why, key=self.prefix + key)

    def expect(self, key: str, allowed: tuple[Any, ...], default: Any) -> Any:
        value = self.config.get(key, default)
        if value not in allowed:
            raise CheckpointError(self.where, f"{value!r} is not supported by seqzoo (expected one of "
                                              f"{list(allowed)})", key=key)
        return value

    def conv(self) -> tuple[bool, int]:
        if "q_conv1d.bias" in self.t:
            raise self.refuse("q_conv1d.bias", "short-conv biases (conv_bias=True) are not supported")
        if "q_conv1d.weight" not in self.t:
            return False, 4
        return True, int(self.get("q_conv1d.weight").shape[-1])


def _delta_rule(layer: _Layer, *, gated: bool) -> tuple[int, dict[str, Any], dict[str, str]]:
    q = layer.get("q_proj.weight")
    d_model = q.shape[1]
    heads = layer.get("a_proj.weight" if gated else "b_proj.weight").shape[0]
    if q.shape[0] % heads:
        raise layer.refuse("q_proj.weight", f"{q.shape[0]} rows do not split into {heads} heads")
    dk = q.shape[0] // heads
    dv, rem = divmod(layer.get("v_proj.weight").shape[0], heads)
    if rem or layer.get("b_proj.weight").shape[0] != heads:
        raise layer.refuse("v_proj.weight", "grouped value heads (num_v_heads != num_heads) are not supported")
    if not gated:
        layer.expect("qk_activation", ("silu",), "silu")
        layer.expect("qk_norm", ("l2",), "l2")
        layer.expect("use_beta", (True,), True)
    layer.expect("output_gate_activation", ("swish", "silu"), "swish")
    use_conv, conv_size = layer.conv()
    use_gate = "g_proj.weight" in layer.t
    params = dict(n_heads=heads, head_dim=dk, expand_v=dv / dk, use_short_conv=use_conv, conv_size=conv_size,
                  allow_neg_eigval=bool(layer.config.get("allow_neg_eigval", False)),
                  norm_eps=float(layer.config.get("norm_eps", 1e-5)), use_gate=use_gate)
    keys = {k: k for k in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "b_proj.weight", "o_proj.weight")}
    if gated:
        keys.update({k: k for k in ("a_proj.weight", "A_log", "dt_bias")})
    if use_conv:
        keys.update({f"{c}_conv1d.weight": f"{c}_conv.conv.weight" for c in "qkv"})
    if use_gate:
        keys.update({"g_proj.weight": "g_proj.weight", "o_norm.weight": "o_norm.norm.weight"})
    else:
        keys["o_norm.weight"] = "o_norm.weight"
    return d_model, params, keys


def _output_norm_key(layer: _Layer) -> str:
    if layer.config.get("feature_map") is not None:
        raise CheckpointError(layer.where, "feature maps on q, k are not supported", key="feature_map")
    if "q_conv1d.weight" in layer.t:
        raise layer.refuse("q_conv1d.weight", "short convolutions are not supported by seqzoo's gla / retnet")
    if "g_proj.weight" not in layer.t:
        raise layer.refuse("g_proj.weight", "layers without the output gate (use_output_gate=False) are not supported")
    layer.expect("gate_fn", ("swish",), "swish")
    return "g_norm_swish_gate.weight" if "g_norm_swish_gate.weight" in layer.t else "g_norm.weight"


def _gla(layer: _Layer) -> tuple[int, dict[str, Any], dict[str, str]]:
    norm = _output_norm_key(layer)
    q, v = layer.get("q_proj.weight"), layer.get("v_proj.weight")
    d_model, key_dim, value_dim = q.shape[1], q.shape[0], v.shape[0]
    heads = value_dim // layer.get(norm).shape[0]
    if layer.get("k_proj.weight").shape[0] != key_dim:
        raise layer.refuse("k_proj.weight", "grouped key/value heads (num_kv_heads) are not supported")
    if layer.config.get("clamp_min") is not None:
        raise CheckpointError(layer.where, "a clamp of the log gates is not supported", key="clamp_min")
    params = dict(n_heads=heads, expand_k=key_dim / d_model, expand_v=value_dim / d_model,
                  gate_low_rank=layer.get("gk_proj.0.weight").shape[0],
                  gate_temperature=float(layer.config.get("gate_logit_normalizer", 16)),
                  norm_eps=float(layer.config.get("norm_eps", 1e-5)), output_norm="rms")
    keys = {"q_proj.weight": "q_proj.weight", "k_proj.weight": "k_proj.weight", "v_proj.weight": "v_proj.weight",
            "g_proj.weight": "r_proj.weight", "gk_proj.0.weight": "gate_down.weight",
            "gk_proj.1.weight": "gate_up.weight", "gk_proj.1.bias": "gate_up.bias", norm: "norm.weight",
            "o_proj.weight": "out.weight"}
    return d_model, params, keys


def _retnet(layer: _Layer) -> tuple[int, dict[str, Any], dict[str, str]]:
    norm = _output_norm_key(layer)
    q, v = layer.get("q_proj.weight"), layer.get("v_proj.weight")
    d_model, value_dim = q.shape[1], v.shape[0]
    if q.shape[0] != d_model:
        raise layer.refuse("q_proj.weight", f"key width {q.shape[0]} != d_model={d_model}: seqzoo's retnet has "
                                            f"expand_k = 1")
    if layer.get("k_proj.weight").shape[0] != d_model:
        raise layer.refuse("k_proj.weight", "grouped key/value heads (num_kv_heads) are not supported")
    params = dict(n_heads=value_dim // layer.get(norm).shape[0], expand_v=value_dim / d_model,
                  norm_eps=float(layer.config.get("norm_eps", 1e-5)), output_norm="rms")
    keys = {"q_proj.weight": "q_proj.weight", "k_proj.weight": "k_proj.weight", "v_proj.weight": "v_proj.weight",
            "g_proj.weight": "g_proj.weight", norm: "norm.weight", "o_proj.weight": "out.weight"}
    return d_model, params, keys


_KINDS: dict[str, Callable[[_Layer], tuple[int, dict[str, Any], dict[str, str]]]] = {
    "gated_deltanet": lambda layer: _delta_rule(layer, gated=True),
    "deltanet": lambda layer: _delta_rule(layer, gated=False),
    "gla": _gla,
    "retnet": _retnet,
}


def _copy(mixer, layer: _Layer, keys: Mapping[str, str]) -> None:
    unknown = sorted(set(layer.t) - set(keys))
    if unknown:
        raise layer.refuse(unknown[0], f"a tensor seqzoo's {mixer.name} has no place for (unsupported fla "
                                       f"option?); all unexpected: {unknown}")
    ours = dict(mixer.named_parameters())
    with torch.no_grad():
        for theirs, mine in keys.items():
            tensor = layer.get(theirs)
            if tuple(tensor.shape) != tuple(ours[mine].shape):
                raise layer.refuse(theirs, f"has shape {tuple(tensor.shape)}, seqzoo's {mine} {tuple(ours[mine].shape)}")
            ours[mine].copy_(tensor)
        if mixer.name == "gla":
            mixer.r_proj.bias.zero_()  # fla's output gate has no bias


def _source(weights: Mapping[str, Tensor] | str | Path) -> tuple[dict[str, Tensor], str]:
    if isinstance(weights, (str, Path)):
        return read_weights(weights)
    return dict(weights), "<state_dict>"


def load_fla_layer(kind: str, weights: Mapping[str, Tensor] | str | Path, *,
                   config: Mapping[str, Any] | None = None, prefix: str = "", backend: str = "auto"):
    """A seqzoo mixer (``kind``: gated_deltanet, deltanet, gla, retnet) holding an fla
    layer's weights: a state_dict or a checkpoint file, ``prefix`` selecting one layer of a
    bigger one, ``config`` fla's keyword arguments of that layer."""
    from seqzoo import mixers

    tensors, where = _source(weights)
    if kind not in _KINDS:
        raise CheckpointError(where, f"expected one of {sorted(_KINDS)}, got {kind!r}", key="kind")
    layer = _Layer(tensors, config or {}, where, prefix)
    d_model, params, keys = _KINDS[kind](layer)
    mixer = mixers.build(kind, d_model=d_model, backend=backend, **params)
    _copy(mixer, layer, keys)
    return mixer


def load_fla_model(path: str | Path, *, config: Mapping[str, Any] | None = None, backend: str = "auto"):
    """A seqzoo ``LanguageModel`` from an fla ``*ForCausalLM`` checkpoint directory (or a
    weights file with ``config`` given: the model's config.json as a dict)."""
    tensors, where, cfg, cfg_where, kind = read_model(path, config, MODEL_TYPES, "fla")
    if cfg.get("attn"):
        raise CheckpointError(cfg_where, "hybrid models with attention layers are not supported", key="attn")
    n_layers = int(cfg.get("num_hidden_layers", 0))
    if n_layers < 1 or f"model.layers.{n_layers - 1}.attn_norm.weight" not in tensors:
        raise CheckpointError(where, f"config says {n_layers} layers; the weights do not hold them",
                              key=f"model.layers.{max(n_layers - 1, 0)}.attn_norm.weight")
    layer0 = _Layer(tensors, cfg, where, "model.layers.0.attn.")
    d_model, params, _ = _KINDS[kind](layer0)
    embed = take(tensors, FLA_MODEL_KEYS.embed, where)
    model = build_language_model(name=f"fla-{kind}", d_model=d_model, n_layers=n_layers, vocab_size=embed.shape[0],
                                 mixer=kind, params={**params, "backend": backend},
                                 mlp_hidden=take(tensors, FLA_MODEL_KEYS.mlp_gate.format(i=0), where).shape[0],
                                 norm_eps=float(cfg.get("norm_eps", 1e-6)),
                                 tie=bool(cfg.get("tie_word_embeddings", False)), where=where)
    for i, block in enumerate(model.blocks):
        layer = _Layer(tensors, cfg, where, f"model.layers.{i}.attn.")
        _, params_i, keys = _KINDS[kind](layer)
        if params_i != params:
            raise layer.refuse("", f"layer {i} differs from layer 0 ({params_i} vs {params}): not supported")
        _copy(block.mixer, layer, keys)
    load_non_mixer_weights(model, tensors, FLA_MODEL_KEYS, where)
    refuse_unplaced(tensors, FLA_MODEL_KEYS, n_layers=n_layers, mixer_prefix="model.layers.{i}.attn.", where=where)
    return model
