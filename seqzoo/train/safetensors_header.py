"""Read and check a safetensors header before any tensor is read.

The format (https://github.com/huggingface/safetensors): 8 bytes little-endian header length
N, N bytes of JSON ``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}``,
then the tensor bytes, contiguous and in order. A file whose header disagrees with its size,
or whose names, dtypes or shapes are not the ones the model expects, is refused here, so a
damaged or foreign file never costs a full read (a header may declare a 16 GiB tensor).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from seqzoo.errors import CheckpointError

MAX_HEADER_BYTES = 100 * 2**20  # the reference implementation's own limit

DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
}


@dataclass(frozen=True)
class TensorEntry:
    dtype: torch.dtype
    shape: tuple[int, ...]


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Name -> dtype and shape, after checking that the header describes exactly this file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(str(path), f"corrupt safetensors file: {size} bytes, shorter than a header")
            (n,) = struct.unpack("<Q", prefix)
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(str(path), f"corrupt safetensors file: header of {n:,} bytes in a file of {size:,}")
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(str(path), "missing file") from None
    except OSError as err:
        raise CheckpointError(str(path), f"cannot be read: {err.strerror}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise CheckpointError(str(path), "corrupt safetensors file: the header is not JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(str(path), "corrupt safetensors file: the header is not a JSON object")
    entries: dict[str, TensorEntry] = {}
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entry, span = _entry(path, name, info)
        entries[name] = entry
        spans.append(span)
    offset = 0
    for begin, end, name in sorted(spans):
        if begin != offset:
            raise CheckpointError(str(path), "corrupt safetensors file: tensor data overlaps or leaves a gap", key=name)
        offset = end
    if 8 + n + offset != size:
        raise CheckpointError(str(path), f"corrupt safetensors file: the header describes {8 + n + offset:,} bytes, "
                              f"the file holds {size:,}")
    return entries


def _entry(path: Path, name: str, info: object) -> tuple[TensorEntry, tuple[int, int, str]]:
    bad = CheckpointError(str(path), "corrupt safetensors file: expected {dtype, shape, data_offsets}", key=name)
    if not isinstance(info, dict):
        raise bad
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPES or not isinstance(shape, list) or not isinstance(offsets, list) or len(offsets) != 2:
        raise bad
    if not all(type(d) is int and d >= 0 for d in shape) or not all(type(o) is int and o >= 0 for o in offsets):
        raise bad
    torch_dtype, itemsize = DTYPES[dtype]
    begin, end = offsets
    if end - begin != math.prod(shape) * itemsize:
        raise CheckpointError(str(path), f"corrupt safetensors file: shape {shape} of {dtype} needs "
                              f"{math.prod(shape) * itemsize:,} bytes, the header gives {end - begin:,}", key=name)
    return TensorEntry(torch_dtype, tuple(shape)), (begin, end, name)


def check_entries(path: Path, found: dict[str, TensorEntry], expected: dict[str, TensorEntry], *, what: str) -> None:
    """Refuse a file whose tensors are not exactly ``expected`` (names, dtypes, shapes)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        raise CheckpointError(str(path), f"missing from the checkpoint (does {what} match?)", key=missing[0])
    if unexpected:
        raise CheckpointError(str(path), f"in the checkpoint but not in {what} (does it match?)", key=unexpected[0])
    for name, want in expected.items():
        got = found[name]
        if got.shape != want.shape:
            raise CheckpointError(str(path), f"shape {got.shape} in the checkpoint, {want.shape} expected by {what}",
                                  key=name)
        if got.dtype != want.dtype:
            raise CheckpointError(str(path), f"dtype {got.dtype} in the checkpoint, {want.dtype} expected by {what}",
                                  key=name)
