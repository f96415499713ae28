"""Command-line overrides: ``KEY=VALUE`` pairs with dotted keys into a recipe or sweep.

    seqzoo train recipes/tiny-attention.yaml train.lr=1e-3 model.mixers.attn.window=32

A value is read as a YAML scalar or flow collection (``32``, ``true``, ``null``, ``[a, b]``,
``{type: mamba}``), except that ``1e-3`` counts as a number (plain YAML 1.1 would keep it a
string). The overridden mapping then goes through the same validation as the file, so a
typo or a bad value is the usual one-line error naming the key; :func:`blame` adds which
override set it.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Sequence, TypeVar

import yaml

from seqzoo.errors import RecipeError, SeqzooError

Override = tuple[str, Any]  # (dotted key, parsed value)
T = TypeVar("T")


def _scalar(text: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SeqzooError(f"override value {text!r}: not a YAML value ({str(err).splitlines()[0]})") from None
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    return value


def parse_overrides(items: Sequence[str]) -> list[Override]:
    """``["train.lr=1e-3", ...]`` -> ``[("train.lr", 0.001), ...]``."""
    out = []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise SeqzooError(f"override {item!r}: expected KEY=VALUE with a dotted KEY, e.g. train.lr=1e-3")
        out.append((key, _scalar(text)))
    return out


def apply_overrides(data: dict[str, Any], overrides: Sequence[Override], *, path: str) -> dict[str, Any]:
    """A deep copy of ``data`` with every override set. Missing mappings on the way are
    created (validation then rejects unknown keys); integer parts index into lists."""
    out = copy.deepcopy(data)
    for key, value in overrides:
        node: Any = out
        parts = key.split(".")
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[:depth + 1])
            if isinstance(node, list):
                if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
                    raise RecipeError(path, where, f"override {key}: expected a list index below {len(node)}")
                idx = int(part)
                if last:
                    node[idx] = value
                else:
                    node = node[idx]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
            else:
                parent = ".".join(parts[:depth])
                raise RecipeError(path, parent, f"override {key}: {parent} holds a {type(node).__name__}, "
                                  f"not a mapping or list")
    return out


def blame(err: RecipeError, overrides: Sequence[Override]) -> RecipeError:
    """The same error, saying which override set the offending key (if one did)."""
    for key, value in overrides:
        if err.key and (err.key == key or err.key.startswith(key + ".") or key.startswith(err.key + ".")):
            shown = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
            return RecipeError(err.path, err.key, f"{err.message} (set on the command line: {key}={shown})")
    return err


def load_with_overrides(data: Any, items: Sequence[str], *, path: str, validate: Callable[[Any], T]) -> T:
    """Apply ``items`` to the parsed file ``data`` and run ``validate(data)``; an error that
    an override caused says so."""
    overrides = parse_overrides(items)
    if overrides and isinstance(data, dict):
        data = apply_overrides(data, overrides, path=path)
    try:
        return validate(data)
    except RecipeError as err:
        raise blame(err, overrides) from None
