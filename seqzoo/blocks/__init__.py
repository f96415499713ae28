"""Blocks: norms, residuals and MLPs around a mixer; ``stack`` turns a recipe into layers."""

from seqzoo.blocks.residual import Block

__all__ = ["Block"]
