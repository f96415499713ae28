"""Loading a Hugging Face transformers ``MambaForCausalLM`` or ``Mamba2ForCausalLM`` (a
``save_pretrained`` directory: config.json + weights) into a seqzoo ``LanguageModel``:
embedding, every layer, the final norm and the head. No transformers import is needed.

transformers' layers hold mamba-ssm's parameter names (``backbone.layers.{i}.mixer.*``),
so each mixer loads through ``seqzoo.interop.mamba`` / ``seqzoo.interop.mamba2``; a block
is x + mixer(RMSNorm(x)) (``backbone.layers.{i}.norm``), no MLP, then ``backbone.norm_f``
and ``lm_head`` (tied to the embedding unless ``tie_word_embeddings`` is false).

From the config, not the shapes: ``layer_norm_epsilon`` (block, final and Mamba2's gated
norms), Mamba2's ``n_groups`` (a state_dict shows only n_groups · state_size) and
``time_step_limit``. Numerics: with ``residual_in_fp32`` transformers keeps the residual
stream in fp32 under half precision, seqzoo in the activation dtype; fp32 runs are equal.
transformers' Mamba / Mamba2 have no negative-eigenvalue option, so the mixers built here
keep ``allow_neg_eigval=False`` (the per-layer loaders refuse a mixer that has it).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

from seqzoo.errors import CheckpointError
from seqzoo.interop.files import read_model, take
from seqzoo.interop.lm import BlockKeys, build_language_model, load_non_mixer_weights, refuse_unplaced
from seqzoo.interop.mamba import load_mamba_state_dict, mamba_config_from_state_dict
from seqzoo.interop.mamba2 import CheckpointMismatchError, load_mamba2_state_dict, mamba2_config_from_state_dict

HF_KEYS = BlockKeys(embed="backbone.embeddings.weight", mixer_norm="backbone.layers.{i}.norm.weight",
                    final_norm="backbone.norm_f.weight")
MODEL_TYPES = {"mamba": "mamba", "mamba2": "mamba2"}


def _config_value(cfg: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in cfg:
        why = ("the weights record only n_groups * state_size; the config must say n_groups"
               if key == "n_groups" else "missing from the config")
        raise CheckpointError(where, why, key=key)
    return cfg[key]


def load_hf_mamba(path: str | Path, *, config: Mapping[str, Any] | None = None, backend: str = "auto"):
    """A seqzoo LanguageModel holding a transformers Mamba / Mamba2 causal LM. ``path``: the
    ``save_pretrained`` directory (or a weights file, with ``config`` its config.json as a
    dict). The model is fp32, like ``LanguageModel``'s default."""
    tensors, where, cfg, cfg_where, kind = read_model(path, config, MODEL_TYPES, "transformers")
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(cfg_where, f"{cfg['hidden_act']!r}: seqzoo's mixers use SiLU", key="hidden_act")
    n_layers = int(_config_value(cfg, "num_hidden_layers", cfg_where))
    prefix = "backbone.layers.{i}.mixer."
    take(tensors, prefix.format(i=n_layers - 1) + "in_proj.weight", where)  # every layer the config announces
    try:
        if kind == "mamba":
            d_model, params = mamba_config_from_state_dict(tensors, prefix=prefix.format(i=0))
        else:
            limit = tuple(float(x) for x in cfg.get("time_step_limit", (0.0, math.inf)))
            d_model, params = mamba2_config_from_state_dict(
                tensors, n_groups=int(_config_value(cfg, "n_groups", cfg_where)), prefix=prefix.format(i=0),
                dt_limit=limit, norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)))
    except CheckpointMismatchError as err:
        raise CheckpointError(where, str(err)) from None
    eps = float(cfg.get("layer_norm_epsilon", 1e-5))
    model = build_language_model(name=f"hf-{kind}", d_model=d_model, n_layers=n_layers,
                                 vocab_size=take(tensors, HF_KEYS.embed, where).shape[0], mixer=kind,
                                 params={**params, "backend": backend}, mlp_hidden=None, norm_eps=eps,
                                 tie=bool(cfg.get("tie_word_embeddings", kind == "mamba")), where=where)
    load = load_mamba_state_dict if kind == "mamba" else load_mamba2_state_dict
    for i, block in enumerate(model.blocks):
        layer = {k: v for k, v in tensors.items() if k.startswith(prefix.format(i=i))}
        try:
            load(block.mixer, layer, prefix=prefix.format(i=i))
        except CheckpointMismatchError as err:
            raise CheckpointError(where, str(err)) from None
    load_non_mixer_weights(model, tensors, HF_KEYS, where)
    refuse_unplaced(tensors, HF_KEYS, n_layers=n_layers, mixer_prefix=prefix, where=where)
    return model
