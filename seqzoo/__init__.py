"""seqzoo: compose, train and compare token mixers behind one contract.

    import seqzoo
    recipe = seqzoo.load_recipe("recipes/tiny-attention.yaml")
    model = seqzoo.build_model(recipe)
    logits, state = model(tokens)            # (B, T) -> (B, T, V)
    run = seqzoo.load_run("runs/tiny-attention")   # .model .recipe .step .task
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from seqzoo.errors import CheckpointError, RecipeError, SeqzooError
from seqzoo.recipes import Recipe, load_recipe, recipe_from_dict
from seqzoo.runs import LoadedRun, load_run

if TYPE_CHECKING:
    from seqzoo.models.lm import LanguageModel

__version__ = "0.1.0"


def build_model(recipe_or_path: Recipe | str | Path | dict) -> "LanguageModel":
    """A LanguageModel from a Recipe, a recipe path (or name in ./recipes/), or a dict."""
    from seqzoo.models.lm import LanguageModel

    if isinstance(recipe_or_path, Recipe):
        recipe = recipe_or_path
    elif isinstance(recipe_or_path, dict):
        recipe = recipe_from_dict(recipe_or_path)
    else:
        recipe = load_recipe(recipe_or_path)
    return LanguageModel(recipe)


__all__ = ["CheckpointError", "LoadedRun", "Recipe", "RecipeError", "SeqzooError", "build_model", "load_recipe",
           "load_run", "recipe_from_dict"]
