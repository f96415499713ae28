"""Integrity of a checkpoint: ``state.json`` is validated against a schema and carries a
sha256 of itself and of every tensor file, so a flipped byte, an emptied file or another
run's file of the same shapes is refused when it is loaded, naming the file.

Only the files a command loads are hashed (``eval`` does not read the optimiser state).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from seqzoo.bounded_read import UnreadableFile, read_text_bounded
from seqzoo.errors import CheckpointError
from seqzoo.limits import MAX_JSON_BYTES, MAX_STEPS
from seqzoo.strict_schema import StrictModel, first_error

FORMAT = 2  # 1: seqzoo 0.1 without checksums
STEP_DIR = re.compile(r"^step-([0-9]{7,})$")


class FileDigest(StrictModel):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class OptimizerMeta(StrictModel):
    param_groups: list[dict[str, Any]] = Field(min_length=1)
    scalars: dict[str, float]


class CheckpointState(StrictModel):
    format: Literal[2]
    step: int = Field(ge=1, le=MAX_STEPS)
    recipe: dict[str, Any]
    optimizer: OptimizerMeta
    extra: dict[str, Any]
    files: dict[str, FileDigest]
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @model_validator(mode="after")
    def _step_within_run(self) -> "CheckpointState":
        steps = self.recipe.get("train", {}).get("steps") if isinstance(self.recipe.get("train"), dict) else None
        if type(steps) is int and self.step > steps:
            raise ValueError(f"step {self.step} is beyond the run's train.steps={steps}")
        return self


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def seal(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with the sha256 of its own canonical JSON added (checked by ``read_state``)."""
    body = {k: v for k, v in state.items() if k != "sha256"}
    return {**body, "sha256": hashlib.sha256(canonical_json(body).encode()).hexdigest()}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def digest(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def read_json(path: Path) -> Any:
    """A small JSON file (bounded, regular, UTF-8); errors name the file."""
    try:
        text = read_text_bounded(path, limit=MAX_JSON_BYTES, what="JSON file")
    except UnreadableFile as err:
        raise CheckpointError(err.path, err.message) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise CheckpointError(str(path), f"corrupt JSON: {err.msg} (line {err.lineno}, column {err.colno})") from None
    except RecursionError:
        raise CheckpointError(str(path), "corrupt JSON: nested too deeply") from None


def read_state(ckpt: Path) -> CheckpointState:
    """The validated, self-consistent ``state.json`` of checkpoint directory ``ckpt``."""
    path = Path(ckpt) / "state.json"
    if not path.exists() and not path.is_symlink():
        raise CheckpointError(str(ckpt), "not a checkpoint directory (no state.json)")
    _refuse_link(path)
    data = read_json(path)
    if isinstance(data, dict) and "format" not in data:
        raise CheckpointError(str(path), "written by seqzoo 0.1 without checksums, so it cannot be verified; "
                              "train it again (or load its model.safetensors yourself)")
    try:
        state = CheckpointState.model_validate(data)
    except ValidationError as err:
        key, msg = first_error(err)
        raise CheckpointError(str(path), msg, key=key) from None
    if seal(data)["sha256"] != state.sha256:
        raise CheckpointError(str(path), "checksum mismatch: the file was changed after it was written")
    name = STEP_DIR.match(Path(ckpt).resolve().name)
    if name and int(name.group(1)) != state.step:
        raise CheckpointError(str(path), f"step {state.step} stored in a directory named for step {int(name.group(1))}",
                              key="step")
    return state


def verified_file(ckpt: Path, name: str, state: CheckpointState) -> Path:
    """``ckpt/name`` after checking its size and sha256 against ``state.json``."""
    path = Path(ckpt) / name
    if name not in state.files:
        raise CheckpointError(str(Path(ckpt) / "state.json"), f"no checksum for {name}", key="files")
    _refuse_link(path)
    if not path.is_file():
        raise CheckpointError(str(path), "missing file")
    want = state.files[name]
    size = path.stat().st_size
    if size != want.bytes:
        raise CheckpointError(str(path), f"{size:,} bytes, state.json recorded {want.bytes:,}: the file was "
                              f"truncated or replaced")
    if sha256_file(path) != want.sha256:
        raise CheckpointError(str(path), "checksum mismatch: the file was damaged or replaced after it was written")
    return path


def _refuse_link(path: Path) -> None:
    if path.is_symlink():
        raise CheckpointError(str(path), "is a symbolic link; a checkpoint holds its own files")
