"""Checkpoints: safetensors for tensors, JSON for everything else; never pickle.

Layout of ``OUT/checkpoints/step-000200/``: ``model.safetensors``, ``optimizer.safetensors``
(every optimiser tensor, flattened), ``state.json`` (step, optimiser param groups, the
validated recipe, metrics so far), ``rng.safetensors``. A checkpoint is written into a
temporary directory and renamed into place (atomic on POSIX), then ``latest.json`` is
replaced atomically, so a crash at any moment leaves the previous checkpoint loadable and
a half-written one is never picked up.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from seqzoo.errors import CheckpointError

LATEST = "latest.json"


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, per_param in sd["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(out_dir: Path, *, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    recipe: dict[str, Any], extra: dict[str, Any] | None = None, keep: int = 2) -> Path:
    ckpt_root = Path(out_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:07d}"
    tmp = ckpt_root / f".tmp-step-{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _dedupe_tied(weights)
    save_file(weights, str(tmp / "model.safetensors"))
    opt_tensors, opt_meta = _optimizer_to_flat(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    save_file({"torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    _write_json_atomic(tmp / "state.json", {"step": step, "recipe": recipe, "optimizer": opt_meta,
                                             "extra": extra or {}})
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(ckpt_root)
    _write_json_atomic(ckpt_root / LATEST, {"step": step, "path": final.name})
    for old in sorted(ckpt_root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _dedupe_tied(weights: dict[str, torch.Tensor]) -> None:
    # safetensors refuses shared storage: store a tied head once (it is re-tied on load).
    if "head.weight" in weights and "embed.weight" in weights and torch.equal(weights["head.weight"], weights["embed.weight"]):
        weights["head.weight"] = weights["head.weight"].clone()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")


def _complete(path: Path) -> bool:
    return path.is_dir() and all((path / name).is_file() for name in CHECKPOINT_FILES)


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The checkpoint ``latest.json`` names if it is complete; if the pointer is missing or
    stale (its directory gone or partial), the newest complete ``step-*`` directory. A
    ``.tmp-step-*`` directory (a write cut short) is never a candidate."""
    root = Path(out_dir) / "checkpoints"
    pointer = root / LATEST
    if pointer.exists():
        try:
            path = root / json.loads(pointer.read_text())["path"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(str(pointer), "corrupt pointer file; expected {\"step\": N, \"path\": \"step-...\"}") from None
        if _complete(path):
            return path
    complete = [p for p in sorted(root.glob("step-*")) if _complete(p)]
    return complete[-1] if complete else None


def read_state(ckpt: Path) -> dict[str, Any]:
    state_file = Path(ckpt) / "state.json"
    if not state_file.exists():
        raise CheckpointError(str(ckpt), "not a checkpoint directory (no state.json)")
    try:
        return json.loads(state_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(str(state_file), f"corrupt JSON: {err}") from None


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(str(path), "missing file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(str(path), f"corrupt safetensors file: {err}") from None


def load_model_weights(ckpt: Path, model: nn.Module) -> None:
    path = Path(ckpt) / "model.safetensors"
    assign_weights(model, _load_tensors(path), source=path)


def assign_weights(model: nn.Module, weights: dict[str, torch.Tensor], *, source: Path) -> None:
    """Load ``weights`` into ``model`` after checking names and shapes; errors name ``source``."""
    path = Path(source)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing:
        raise CheckpointError(str(path), f"missing from the checkpoint (does the recipe match?)", key=missing[0])
    if unexpected:
        raise CheckpointError(str(path), "in the checkpoint but not in the model (does the recipe match?)", key=unexpected[0])
    for key, value in weights.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(str(path), f"shape {tuple(value.shape)} in the checkpoint, "
                                  f"{tuple(expected[key].shape)} expected by the model", key=key)
    tied = getattr(model, "head", None) is not None and model.head.weight is getattr(model, "embed", model).weight
    model.load_state_dict(weights, strict=True)
    if tied:
        model.head.weight = model.embed.weight


def load_training_state(ckpt: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    state = read_state(ckpt)
    tensors = _load_tensors(Path(ckpt) / "optimizer.safetensors")
    try:
        optimizer.load_state_dict(_optimizer_from_flat(tensors, state["optimizer"]))
    except (KeyError, ValueError) as err:
        raise CheckpointError(str(ckpt), f"optimizer state does not match the model: {err}") from None
    rng = _load_tensors(Path(ckpt) / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    return state
