"""Recipe -> list of blocks: resolve each layer's mixer entry, inject d_model and layer_idx."""

from __future__ import annotations

from functools import partial

from torch import nn

from seqzoo.blocks.residual import Block
from seqzoo.layers.mlp import SwiGLU
from seqzoo.mixers.base import get
from seqzoo.recipes import Recipe


def build_blocks(recipe: Recipe) -> nn.ModuleList:
    spec = recipe.model
    configs = recipe.mixer_configs()
    mlp_factory = partial(SwiGLU, ratio=spec.mlp_ratio) if spec.mlp == "swiglu" else None
    blocks = []
    for idx, entry in enumerate(spec.layer_names()):
        kind, config = configs[entry]
        mixer = get(kind)(config, d_model=spec.d_model, layer_idx=idx)
        mixer.entry = entry  # the recipe's name for this layer's mixer (for describe())
        blocks.append(Block(spec.d_model, mixer=mixer, mlp_factory=mlp_factory, norm_eps=spec.norm_eps))
    return nn.ModuleList(blocks)
