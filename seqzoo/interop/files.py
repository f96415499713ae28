"""Reading other libraries' checkpoints without executing code: safetensors, or pickles
through ``torch.load(weights_only=True)`` (tensors and plain containers only), and JSON
configs. Every failure is a ``CheckpointError`` naming the file (and the key).

A checkpoint is a file, or a directory as Hugging Face's ``save_pretrained`` writes it:
``config.json`` beside ``model.safetensors`` / ``pytorch_model.bin`` or their sharded
``*.index.json`` form.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from seqzoo.errors import CheckpointError

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def _read_file(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(str(path), f"not a readable safetensors file ({err})") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file
        raise CheckpointError(str(path), f"not a tensor checkpoint loadable with weights_only=True ({err})") from None
    if not isinstance(data, Mapping) or not all(isinstance(v, Tensor) for v in data.values()):
        raise CheckpointError(str(path), "expected a mapping of names to tensors (a state_dict)")
    return dict(data)


def _read_index(path: Path) -> dict[str, Tensor]:
    index = read_json(path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(str(path), "expected a 'weight_map' of tensor names to shard files", key="weight_map")
    out: dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = path.parent / str(shard)
        if not shard_path.is_file() or shard_path.parent.resolve() != path.parent.resolve():
            raise CheckpointError(str(path), f"shard {shard!r} is not a file beside the index", key="weight_map")
        out.update(_read_file(shard_path))
    missing = sorted(set(weight_map) - set(out))
    if missing:
        raise CheckpointError(str(path), f"tensors named in the index are in no shard: {missing[:5]}", key=missing[0])
    return out


def read_weights(path: str | Path) -> tuple[dict[str, Tensor], str]:
    """All tensors of a checkpoint file or directory, and the file they came from."""
    p = Path(path)
    if p.is_dir():
        found = next((p / name for name in _WEIGHT_FILES if (p / name).is_file()), None)
        if found is None:
            raise CheckpointError(str(p), f"holds no weights (expected one of {list(_WEIGHT_FILES)})")
        p = found
    elif not p.is_file():
        raise CheckpointError(str(p), "no such checkpoint file or directory")
    return (_read_index(p) if p.name.endswith(".index.json") else _read_file(p)), str(p)


def read_json(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    try:
        data = json.loads(p.read_text())
    except OSError as err:
        raise CheckpointError(str(p), f"cannot read the config ({err.strerror or err})") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(str(p), f"not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(str(p), "expected a JSON object")
    return data


def take(tensors: Mapping[str, Tensor], key: str, where: str, shape: tuple[int, ...] | None = None) -> Tensor:
    """``tensors[key]``, checked: a missing key or a wrong shape names the file and the key."""
    if key not in tensors:
        raise CheckpointError(where, "missing tensor", key=key)
    tensor = tensors[key]
    if shape is not None and tuple(tensor.shape) != shape:
        raise CheckpointError(where, f"has shape {tuple(tensor.shape)}, expected {shape}", key=key)
    return tensor


def read_model(path: str | Path, config: Mapping[str, Any] | None, model_types: Mapping[str, str],
               library: str) -> tuple[dict[str, Tensor], str, dict[str, Any], str, str]:
    """A causal-LM checkpoint: (tensors, weights file, config, config file, seqzoo mixer of
    its ``model_type``). ``config`` replaces the directory's config.json when given."""
    tensors, where = read_weights(path)
    cfg = dict(config) if config is not None else read_json(path)
    cfg_where = str(Path(path) / "config.json") if config is None else "<config>"
    kind = model_types.get(cfg.get("model_type"))
    if kind is None:
        raise CheckpointError(cfg_where, f"expected a {library} model of type {sorted(model_types)}, got "
                                         f"{cfg.get('model_type')!r}", key="model_type")
    return tensors, where, cfg, cfg_where, kind
