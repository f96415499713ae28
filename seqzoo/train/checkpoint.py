"""Checkpoints: safetensors for tensors, JSON for everything else; never pickle.

Layout of ``OUT/checkpoints/step-0000200/``: ``model.safetensors``, ``optimizer.safetensors``
(every optimiser tensor, flattened), ``rng.safetensors``, ``state.json`` (format, step,
optimiser param groups, the validated recipe, metrics so far, the sha256 and size of every
tensor file, and a sha256 of itself; see ``checkpoint_verify``).

Nothing lost: a checkpoint is written into a temporary directory and renamed into place
(atomic on POSIX), then ``latest.json`` is replaced atomically, and only then are complete
checkpoints *older* than the new one pruned. A crash or a full disk at any moment leaves
the previous checkpoint loadable; a failed write removes its temporary directory.

Nothing trusted: ``latest.json`` may only name a ``step-NNNNNNN`` directory inside
``checkpoints/`` (no paths, no symbolic links); each file's safetensors header (names,
dtypes, shapes, sizes) is checked against the model before any tensor is read, then its
checksum, then it is loaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from seqzoo.errors import CheckpointError
from seqzoo.train import checkpoint_verify as verify
from seqzoo.train.safetensors_header import TensorEntry, check_entries, read_header

LATEST = "latest.json"
CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")
TENSOR_FILES = CHECKPOINT_FILES[:3]
ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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


# -- writing ----------------------------------------------------------------------------------
def save_checkpoint(out_dir: Path, *, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    recipe: dict[str, Any], extra: dict[str, Any] | None = None, keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest.json`` at it, prune older ones.
    A write that fails (disk full, read-only) raises CheckpointError and leaves what was there."""
    root = Path(out_dir) / "checkpoints"
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(_unshared({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}),
                  str(tmp / "model.safetensors"))
        opt_tensors, opt_meta = _optimizer_to_flat(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file({"torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        files = {name: verify.digest(tmp / name) for name in TENSOR_FILES}
        _write_json_atomic(tmp / "state.json", verify.seal({
            "format": verify.FORMAT, "step": step, "recipe": recipe, "optimizer": opt_meta,
            "extra": extra or {}, "files": files}))
        _fsync_dir(tmp)
        _replace_dir(tmp, final)
        _fsync_dir(root)
        _write_json_atomic(root / LATEST, {"step": step, "path": final.name})
    except (OSError, SafetensorError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(str(root), f"could not write checkpoint step {step}: {_reason(err)}; "
                              f"the checkpoints already there are intact") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(root, newest=step, keep=keep)
    return final


def _replace_dir(src: Path, dst: Path) -> None:
    if not dst.exists():
        os.rename(src, dst)
        return
    # A stale directory of the same step (not the pointer's: that is always older): set it
    # aside under a temporary name, so a crash in between leaves nothing half-replaced.
    aside = dst.with_name(f".tmp-replaced-{dst.name}-{os.getpid()}")
    os.rename(dst, aside)
    os.rename(src, dst)
    shutil.rmtree(aside, ignore_errors=True)


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError):
        return err.strerror or str(err)
    found = re.search(r'message: "([^"]+)"', str(err))  # safetensors wraps the OS error in its own
    return found.group(1) if found else " ".join(str(err).split())


def _prune(root: Path, *, newest: int, keep: int) -> None:
    """Remove complete checkpoints older than the ``keep`` newest up to ``newest``; a
    directory with a higher step (a stale one, or another run's) is never touched."""
    older = sorted((s, p) for s, p in _step_dirs(root) if s <= newest and _complete(p))
    for _, path in older[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def clean_stale_temps(out_dir: Path) -> None:
    """Remove what interrupted writes left (``.tmp-*`` directories and JSON temp files).
    Call it only while holding the run's lock: then no write of this run is in flight."""
    root = Path(out_dir) / "checkpoints"
    for path in [*root.glob(".tmp-*"), *root.glob(f".{LATEST}.tmp-*"), Path(out_dir) / "metrics.tmp"]:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _unshared(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage: a tied head is stored as its own copy
    # (re-tied on load). Identity of storage, not equality of values: NaN != NaN.
    seen: set[int] = set()
    out = {}
    for name, tensor in weights.items():
        ptr = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if ptr in seen and tensor.numel() else tensor
        seen.add(ptr)
    return out


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


# -- finding ----------------------------------------------------------------------------------
def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    out = []
    for path in root.glob("step-*"):
        found = verify.STEP_DIR.match(path.name)
        if found and not path.is_symlink():
            out.append((int(found.group(1)), path))
    return sorted(out)


def _complete(path: Path) -> bool:
    return (path.is_dir() and not path.is_symlink()
            and all((path / name).is_file() and not (path / name).is_symlink() for name in CHECKPOINT_FILES))


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The checkpoint ``latest.json`` names if it is complete; if the pointer is missing or
    stale (its directory gone or partial), the newest complete ``step-*`` directory. The
    pointer may only name a directory of ``checkpoints/`` itself; a ``.tmp-*`` directory (a
    write cut short) or a symbolic link is never a candidate."""
    root = Path(out_dir) / "checkpoints"
    pointer = root / LATEST
    if pointer.exists() or pointer.is_symlink():
        if pointer.is_symlink():
            raise CheckpointError(str(pointer), "is a symbolic link; expected the run's own pointer file")
        expected = "expected {\"step\": N, \"path\": \"step-NNNNNNN\"}"
        try:
            data = verify.read_json(pointer)
        except CheckpointError as err:
            raise CheckpointError(str(pointer), f"corrupt pointer file ({err.message}); {expected}") from None
        name = data.get("path") if isinstance(data, dict) else None
        if not isinstance(name, str) or type(data.get("step")) is not int:
            raise CheckpointError(str(pointer), f"corrupt pointer file; {expected}")
        found = verify.STEP_DIR.match(name)
        if not found or int(found.group(1)) != data["step"]:
            raise CheckpointError(str(pointer), f"points at {name!r}; expected a step-NNNNNNN directory inside "
                                  f"{root} matching its step {data['step']}", key="path")
        path = root / name
        if path.is_symlink():
            raise CheckpointError(str(path), "is a symbolic link; a run's checkpoints live inside its own directory")
        if _complete(path):
            return path
    complete = [p for _, p in _step_dirs(root) if _complete(p)]
    return complete[-1] if complete else None


def read_state(ckpt: Path) -> dict[str, Any]:
    """The verified ``state.json`` of a checkpoint (schema, self-checksum, step) as a dict."""
    return verify.read_state(ckpt).model_dump()


# -- loading ----------------------------------------------------------------------------------
def _load_checked(ckpt: Path, name: str, expected: dict[str, TensorEntry], *, what: str,
                  state: verify.CheckpointState) -> dict[str, torch.Tensor]:
    """Header against ``expected``, then size and checksum, then the tensors."""
    path = Path(ckpt) / name
    if path.is_symlink():
        raise CheckpointError(str(path), "is a symbolic link; a checkpoint holds its own files")
    check_entries(path, read_header(path), expected, what=what)
    verify.verified_file(ckpt, name, state)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(str(path), f"corrupt safetensors file: {_reason(err)}") from None


def _entries(tensors: dict[str, torch.Tensor]) -> dict[str, TensorEntry]:
    return {k: TensorEntry(v.dtype, tuple(v.shape)) for k, v in tensors.items()}


def load_model_weights(ckpt: Path, model: nn.Module) -> dict[str, Any]:
    """Load verified weights into ``model`` (re-tying a tied head); returns ``state.json``."""
    state = verify.read_state(ckpt)
    weights = _load_checked(ckpt, "model.safetensors", _entries(model.state_dict()), what="the model", state=state)
    tied = getattr(model, "head", None) is not None and model.head.weight is getattr(model, "embed", model).weight
    model.load_state_dict(weights, strict=True)
    if tied:
        model.head.weight = model.embed.weight
    return state.model_dump()


def assign_weights(model: nn.Module, weights: dict[str, torch.Tensor], *, source: Path) -> None:
    """Load ``weights`` (already read, e.g. from a pretrained directory) into ``model`` after
    checking names and shapes, re-tying a tied head; errors name ``source``."""
    path = Path(source)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing:
        raise CheckpointError(str(path), "missing from the checkpoint (does the recipe match?)", key=missing[0])
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


def read_optimizer_state(ckpt: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The verified optimiser state in torch's layout, checked against ``optimizer``'s
    parameters: every tensor is ``<param index>.<AdamW state>`` with the parameter's shape."""
    state = verify.read_state(ckpt)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    path = Path(ckpt) / "optimizer.safetensors"
    found = read_header(path)
    for name, entry in found.items():
        idx, _, key = name.partition(".")
        if not idx.isdigit() or int(idx) >= len(params) or key not in ADAM_STATE:
            raise CheckpointError(str(path), f"not an AdamW state of one of the model's {len(params)} parameters", key=name)
    indices = sorted({int(name.partition(".")[0]) for name in found})
    expected = {f"{i}.{key}": TensorEntry(torch.float32, ()) if key == "step"
                else TensorEntry(params[i].dtype, tuple(params[i].shape)) for i in indices for key in ADAM_STATE}
    tensors = _load_checked(ckpt, "optimizer.safetensors", expected, what="the optimiser", state=state)
    fresh = optimizer.state_dict()["param_groups"]
    stored = state.optimizer.param_groups
    if [g.get("params") for g in stored] != [g["params"] for g in fresh]:
        raise CheckpointError(str(Path(ckpt) / "state.json"), "parameter groups do not match the model's "
                              "(does the recipe match?)", key="optimizer.param_groups")
    if state.optimizer.scalars:
        raise CheckpointError(str(Path(ckpt) / "state.json"), "AdamW keeps no per-parameter scalars",
                              key="optimizer.scalars")
    # Hyper-parameters come from the recipe, never from the file (the learning rate is set
    # every step anyway): an exact resume has the same values, --allow-recipe-change the new ones.
    groups = [{**{k: v for k, v in new.items() if k != "params"}, "params": old["params"]}
              for old, new in zip(stored, fresh)]
    return _optimizer_from_flat(tensors, {"param_groups": groups, "scalars": {}})


def restore_rng(ckpt: Path) -> None:
    """Set torch's CPU generator to the verified state saved with the checkpoint."""
    state = verify.read_state(ckpt)
    expected = {"torch": TensorEntry(torch.uint8, tuple(torch.get_rng_state().shape))}
    rng = _load_checked(ckpt, "rng.safetensors", expected, what="torch's CPU generator", state=state)
    torch.set_rng_state(rng["torch"])


def load_training_state(ckpt: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Optimiser and generator state of a verified checkpoint; returns ``state.json``."""
    osd = read_optimizer_state(ckpt, optimizer)
    try:
        optimizer.load_state_dict(osd)
    except (KeyError, ValueError) as err:
        raise CheckpointError(str(ckpt), f"optimizer state does not match the model: {err}") from None
    restore_rng(ckpt)
    return read_state(ckpt)
