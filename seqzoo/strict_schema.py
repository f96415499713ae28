"""The one pydantic policy of every schema (recipes, mixers, tasks, sweeps, checkpoints), and
the one way their errors become ``key: what was expected (got ...)``.

Strict: no unknown keys, no coercion (``true`` is not 1, ``"32"`` is not 32, ``1.5`` is not
an int; an int is a valid float), no NaN or infinity. Tuple fields that come from YAML or
JSON lists opt out of strictness with ``Field(strict=False)``; their items stay strict.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

# ser_json_inf_nan: the few fields that admit infinity (mamba2's dt_limit) survive a JSON
# round trip (state.json) as Infinity instead of becoming null.
STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, ser_json_inf_nan="constants")


class StrictModel(BaseModel):
    model_config = STRICT


# Location entries pydantic adds for the branch of a union or a validator, not a key.
_BRANCH = re.compile(r"^(int|float|str|bool|none|bytes|list\[.*|dict\[.*|tuple\[.*|literal\[.*|"
                     r"function-.*|constrained-.*|json-or-python\[.*|lax-.*|strict-.*|is-instance\[.*)$")


def short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def error_key(loc: tuple[Any, ...]) -> str:
    key = ""
    for part in loc:
        if isinstance(part, int):
            key += f"[{part}]"
        elif not _BRANCH.match(str(part)):
            key = f"{key}.{part}" if key else str(part)
    return key


def first_error(err: ValidationError, *, allowed_keys: list[str] | None = None) -> tuple[str, str]:
    """(dotted key, one-line message) of the first problem pydantic found."""
    first = err.errors()[0]
    key = error_key(tuple(first["loc"]))
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key; check its spelling"
        if allowed_keys is not None:
            msg += f" (expected one of {allowed_keys})"
    elif "input" in first and first["type"] != "missing" and "got " not in msg:
        value = first["input"]
        kind = " (a bool)" if isinstance(value, bool) and "bool" not in msg else ""
        msg = f"{msg} (got {short_repr(value)}{kind})"
    return key, " ".join(msg.split())
