"""Models built from recipes."""

from seqzoo.models.lm import LanguageModel

__all__ = ["LanguageModel"]
