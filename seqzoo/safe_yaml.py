"""YAML for recipes and sweeps that cannot execute code nor blow up.

On top of PyYAML's safe loader (plain data only, no Python tags), a document is refused,
with one line naming the file and the key, when it has

* a duplicate key (YAML keeps the last one silently; a recipe with two ``lr:`` is a mistake),
* a key that is not a string (``1:``, ``null:``, ``on:`` read as a bool, ``[a, b]:``),
* nesting deeper than ``MAX_YAML_DEPTH`` (the composer recurses: 3000 levels overflow the stack),
* more than ``MAX_YAML_NODES`` nodes once aliases are expanded (a "billion laughs" bomb is a
  few hundred bytes that validation would walk for ever), or a recursive alias (``&a [*a]``).

The checks run on the composed node graph, before any Python object is constructed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from seqzoo.bounded_read import UnreadableFile, read_text_bounded
from seqzoo.errors import RecipeError
from seqzoo.limits import MAX_RECIPE_BYTES, MAX_YAML_DEPTH, MAX_YAML_NODES

_STR = "tag:yaml.org,2002:str"
_MERGE = "tag:yaml.org,2002:merge"


class _Refused(Exception):
    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key, self.message = key, message


def _where(node: Node) -> str:
    return f"line {node.start_mark.line + 1}"


class _DepthLimitedLoader(yaml.SafeLoader):
    """The safe loader with a bound on nesting while composing (the composer recurses), and
    YAML 1.2's floats: ``1e-3`` and ``3.0e-3`` are numbers (YAML 1.1 reads them as strings)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise _Refused("", f"nested deeper than {MAX_YAML_DEPTH} levels (line {mark.line + 1})")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


_DepthLimitedLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _GraphCheck:
    """Walks the node graph once (aliases are shared nodes): size after expansion, depth
    through aliases, cycles, keys. ``_done`` memoises (expanded size, height) per node."""

    def __init__(self) -> None:
        self._done: dict[int, tuple[int, int]] = {}
        self._active: set[int] = set()

    def walk(self, node: Node, path: str, depth: int) -> tuple[int, int]:
        if depth > MAX_YAML_DEPTH:
            raise _Refused(path, f"nested deeper than {MAX_YAML_DEPTH} levels once aliases are expanded")
        if id(node) in self._active:
            raise _Refused(path, f"a recursive alias ({_where(node)}) refers to a node inside itself")
        if id(node) in self._done:
            size, height = self._done[id(node)]
        else:
            self._active.add(id(node))
            size, height = self._children(node, path, depth)
            self._active.discard(id(node))
            self._done[id(node)] = (size, height)
        if depth + height > MAX_YAML_DEPTH:
            raise _Refused(path, f"nested deeper than {MAX_YAML_DEPTH} levels once aliases are expanded")
        if size > MAX_YAML_NODES:
            raise _Refused(path, f"expands to more than {MAX_YAML_NODES:,} values (an alias bomb?)")
        return size, height

    def _children(self, node: Node, path: str, depth: int) -> tuple[int, int]:
        size, height = 1, 0
        if isinstance(node, SequenceNode):
            items = [(f"{path}[{i}]", child) for i, child in enumerate(node.value)]
        elif isinstance(node, MappingNode):
            items = []
            seen: dict[str, Node] = {}
            for key, value in node.value:
                if key.tag == _MERGE:
                    items.append((path, value))
                    continue
                if not isinstance(key, ScalarNode) or key.tag != _STR:
                    shown = key.value if isinstance(key, ScalarNode) else type(key).__name__.replace("Node", "").lower()
                    raise _Refused(path, f"key {shown!r} ({_where(key)}) is not a string; "
                                         f"every key must be a name (quote it if it reads as a number or bool)")
                if key.value in seen:
                    raise _Refused(_join(path, key.value), f"duplicate key ({_where(seen[key.value])} and "
                                                           f"{_where(key)}); keep one")
                seen[key.value] = key
                items.append((_join(path, key.value), value))
        else:
            return size, height
        for child_path, child in items:
            child_size, child_height = self.walk(child, child_path, depth + 1)
            size += child_size
            height = max(height, child_height + 1)
            if size > MAX_YAML_NODES:
                raise _Refused(path, f"expands to more than {MAX_YAML_NODES:,} values (an alias bomb?)")
        return size, height


def _yaml_problem(err: yaml.YAMLError) -> str:
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        what = " ".join(p for p in (err.context, err.problem) if p)
        return f"{what}{where}"
    return " ".join(str(err).split())


def parse_yaml(text: str, *, source: str) -> Any:
    """The plain data of one YAML document, or a RecipeError naming ``source`` and the key."""
    loader = None
    try:
        loader = _DepthLimitedLoader(text)  # the reader refuses control characters here
        node = loader.get_single_node()
        if node is None:
            return None
        _GraphCheck().walk(node, "", 0)
        return loader.construct_document(node)
    except _Refused as err:
        raise RecipeError(source, err.key, err.message) from None
    except yaml.YAMLError as err:
        raise RecipeError(source, "", f"not valid YAML: {_yaml_problem(err)}") from None
    except (ValueError, OverflowError) as err:  # Python refuses integers of more than 4300 digits
        raise RecipeError(source, "", f"a number is too long to read ({str(err).split(':')[0]})") from None
    finally:
        if loader is not None:
            loader.dispose()


def load_yaml_file(path: str | Path, *, what: str = "recipe file") -> Any:
    """Read (bounded, regular files only, UTF-8) and parse a YAML file."""
    try:
        text = read_text_bounded(path, limit=MAX_RECIPE_BYTES, what=what)
    except UnreadableFile as err:
        raise RecipeError(err.path, "", err.message) from None
    return parse_yaml(text, source=str(path))
