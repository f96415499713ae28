"""Resume is exact or refused: the recipe a checkpoint was trained with against the given one.

Both are compared in canonical form (every default filled in, the layer pattern tiled, the
vocabulary resolved), so writing a default out or a pattern as an explicit list is not a
change. Ignored: ``description`` and ``train.device`` (resuming a CPU run on a GPU is the
same run on other hardware). Anything else that differs — name, a mixer setting, lr,
batch size, steps — is a different run, refused unless ``--allow-recipe-change``.
"""

from __future__ import annotations

from typing import Any

from seqzoo.errors import RecipeError, SeqzooError
from seqzoo.recipes import Recipe, recipe_from_dict
from seqzoo.strict_schema import short_repr

IGNORED = ("description", "train.device", "train.log")


def canonical(recipe: Recipe) -> dict[str, Any]:
    from seqzoo.tasks import build_task

    data = recipe.model_dump(mode="json")
    data["task"] = {"type": recipe.task["type"], **build_task(recipe.task).config.model_dump(mode="json")}
    model = data["model"]
    model["mixers"] = {entry: {"type": kind, **config.model_dump(mode="json")}
                       for entry, (kind, config) in recipe.mixer_configs().items()}
    model["layers"], model["vocab_size"] = recipe.model.layer_names(), recipe.vocab_size()
    model.pop("pattern")
    data.pop("description")
    data["train"].pop("device")
    data["train"].pop("log", None)
    return data


def first_difference(a: Any, b: Any, key: str = "") -> tuple[str, Any, Any] | None:
    """The first dotted key at which ``a`` and ``b`` differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in [*a, *(k for k in b if k not in a)]:
            found = first_difference(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{key}.{k}" if key else k)
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            found = first_difference(x, y, f"{key}[{i}]")
            if found:
                return found
        return None
    same_kind = isinstance(a, bool) == isinstance(b, bool)  # True == 1 in Python, not in a recipe
    return None if a == b and same_kind else (key, a, b)


def check_same_recipe(stored: dict[str, Any], given: Recipe, *, state_path: str, allow_change: bool) -> str | None:
    """Raise unless ``given`` is the recipe ``stored`` in the checkpoint; with
    ``allow_change`` return a one-line description of the first change instead (or None)."""
    try:
        before = canonical(recipe_from_dict(stored, path=state_path))
    except RecipeError as err:
        if allow_change:
            return f"the stored recipe is not valid under this seqzoo ({err.key or 'recipe'}: {err.message})"
        raise SeqzooError(f"{state_path}: recipe.{err.key}: the stored recipe is not valid under this seqzoo "
                          f"({err.message}); pass --allow-recipe-change to resume with the given recipe") from None
    found = first_difference(before, canonical(given))
    if found is None:
        return None
    key, old, new = found
    change = f"{key}: the checkpoint was trained with {short_repr(old)}, the recipe gives {short_repr(new)}"
    if allow_change:
        return change
    raise SeqzooError(f"{state_path}: {change}; --resume continues only the same run (pass "
                      f"--allow-recipe-change to continue with the changed recipe)")
