"""Building blocks shared by mixers and blocks: norms, MLPs, short conv, rotary, gating."""

from seqzoo.layers.mlp import SwiGLU
from seqzoo.layers.norms import GatedRMSNorm, RMSNorm
from seqzoo.layers.rotary import Rotary
from seqzoo.layers.short_conv import ShortConv

__all__ = ["GatedRMSNorm", "RMSNorm", "Rotary", "ShortConv", "SwiGLU"]
