"""Assembling a seqzoo ``LanguageModel`` from another library's causal LM: the recipe its
shapes imply and the weights outside the mixers (embedding, pre-norms, SwiGLU MLP, final
norm, head). The mixers' own weights are loaded by the library-specific modules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

from seqzoo.errors import CheckpointError
from seqzoo.interop.files import take
from seqzoo.layers.mlp import swiglu_hidden


@dataclass(frozen=True)
class BlockKeys:
    """Where a library keeps the non-mixer weights; ``{i}`` is the layer index."""

    embed: str
    mixer_norm: str
    final_norm: str
    head: str = "lm_head.weight"
    mlp_norm: str | None = None
    mlp_gate: str | None = None  # SwiGLU: down(silu(gate(x)) * up(x))
    mlp_up: str | None = None
    mlp_down: str | None = None


def mlp_ratio_for(hidden: int, d_model: int, where: str, key: str) -> float:
    """The ``mlp_ratio`` for which seqzoo's SwiGLU has exactly ``hidden`` units."""
    ratio = 3 * hidden / (2 * d_model)
    if swiglu_hidden(d_model, ratio) != hidden:
        raise CheckpointError(where, f"an MLP of {hidden} hidden units (d_model={d_model}) is not a width seqzoo's "
                                     f"SwiGLU takes (a multiple of 16)", key=key)
    return ratio


def build_language_model(*, name: str, d_model: int, n_layers: int, vocab_size: int, mixer: str,
                         params: Mapping[str, Any], mlp_hidden: int | None, norm_eps: float, tie: bool,
                         where: str):
    """The LanguageModel of one mixer type tiled over ``n_layers`` (weights random)."""
    import seqzoo

    if vocab_size < 256:
        raise CheckpointError(where, f"vocab of {vocab_size} tokens: seqzoo's models need >= 256 (its byte "
                                     f"task)", key="vocab_size")
    ratio = mlp_ratio_for(mlp_hidden, d_model, where, "mlp") if mlp_hidden else 4.0
    return seqzoo.build_model({
        "name": name, "task": {"type": "bytes"},
        "model": {"vocab_size": vocab_size, "d_model": d_model, "n_layers": n_layers,
                  "mixers": {mixer: {"type": mixer, **params}}, "pattern": [mixer],
                  "mlp": "swiglu" if mlp_hidden else "none", "mlp_ratio": ratio, "norm_eps": norm_eps,
                  "tie_embeddings": tie}})


def load_non_mixer_weights(model, tensors: Mapping[str, Tensor], keys: BlockKeys, where: str) -> None:
    """Copy embedding, norms, MLPs and head into ``model`` (shapes checked, in place)."""
    d, v = model.recipe.model.d_model, model.vocab_size
    pairs: list[tuple[Tensor, Tensor]] = [(model.embed.weight, take(tensors, keys.embed, where, (v, d))),
                                          (model.norm.weight, take(tensors, keys.final_norm, where, (d,)))]
    if not model.recipe.model.tie_embeddings:
        pairs.append((model.head.weight, take(tensors, keys.head, where, (v, d))))
    for i, block in enumerate(model.blocks):
        pairs.append((block.mixer_norm.weight, take(tensors, keys.mixer_norm.format(i=i), where, (d,))))
        if block.mlp is not None:
            hidden = block.mlp.w_out.weight.shape[1]
            gate = take(tensors, keys.mlp_gate.format(i=i), where, (hidden, d))
            up = take(tensors, keys.mlp_up.format(i=i), where, (hidden, d))
            pairs += [(block.mlp_norm.weight, take(tensors, keys.mlp_norm.format(i=i), where, (d,))),
                      (block.mlp.w_in.weight, torch.cat([gate, up], 0)),  # seqzoo's w_in rows: [gate; up]
                      (block.mlp.w_out.weight, take(tensors, keys.mlp_down.format(i=i), where, (d, hidden)))]
    with torch.no_grad():
        for param, tensor in pairs:
            param.copy_(tensor)


def refuse_unplaced(tensors: Mapping[str, Tensor], keys: BlockKeys, *, n_layers: int, mixer_prefix: str,
                    where: str) -> None:
    """A tensor neither the blocks nor a mixer took means a variant seqzoo does not model."""
    placed = {keys.embed, keys.final_norm, keys.head}
    per_layer = [k for k in (keys.mixer_norm, keys.mlp_norm, keys.mlp_gate, keys.mlp_up, keys.mlp_down) if k]
    placed |= {k.format(i=i) for i in range(n_layers) for k in per_layer}
    prefixes = tuple(mixer_prefix.format(i=i) for i in range(n_layers))
    unknown = sorted(k for k in tensors if k not in placed and not k.startswith(prefixes))
    if unknown:
        raise CheckpointError(where, f"tensors seqzoo's model has no place for: {unknown[:5]}", key=unknown[0])
