"""A run directory, read back in one line: ``seqzoo.load_run(run_dir)``.

A run directory (``seqzoo train --out``) holds ``recipe.yaml`` (the effective recipe, after
command-line overrides), ``metrics.jsonl``, ``checkpoints/step-NNNNNNN/`` and
``checkpoints/latest.json``. Loading reads JSON and safetensors only; no code is executed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from seqzoo.errors import CheckpointError
from seqzoo.recipes import Recipe, recipe_from_dict

if TYPE_CHECKING:
    import torch

    from seqzoo.models.lm import LanguageModel
    from seqzoo.tasks import Task

RECIPE_FILE = "recipe.yaml"


@dataclasses.dataclass(frozen=True)
class LoadedRun:
    model: "LanguageModel"  # in eval mode, on ``device``
    recipe: Recipe
    step: int  # optimiser steps the weights have seen
    task: "Task"  # the recipe's task (data is read lazily, on first batch)
    checkpoint: Path
    device: "torch.device"


def load_run(run: str | Path, *, device: str = "cpu", batch_size: int = 1, seq_len: int | None = None) -> LoadedRun:
    """The model, recipe, step and task of a run directory's latest checkpoint (or of a
    checkpoint directory itself), verified (checksums, shapes) and refused before allocating
    if the model with ``batch_size`` sequences of ``seq_len`` (default: the task's) cannot
    fit. ``device``: cpu | cuda | cuda:N | auto."""
    from seqzoo.models.lm import LanguageModel
    from seqzoo.tasks import build_task
    from seqzoo.train import checkpoint as ckpt
    from seqzoo.train.loop import resolve_device
    from seqzoo.train.memory_budget import check_fits

    path = Path(run)
    if not path.is_dir():
        raise CheckpointError(str(path), "no such run or checkpoint directory" if not path.exists()
                              else "not a directory; expected a run or checkpoint directory")
    target = path if (path / "state.json").exists() else ckpt.latest_checkpoint(path)
    if target is None:
        raise CheckpointError(str(path), "holds no checkpoint (expected checkpoints/latest.json or state.json)")
    state = ckpt.read_state(target)
    if "recipe" not in state:
        raise CheckpointError(str(target / "state.json"), "no recipe stored", key="recipe")
    recipe = recipe_from_dict(state["recipe"], path=str(target / "state.json"))
    dev = resolve_device(device)
    task = build_task(recipe.task)
    check_fits(recipe, device=dev, seq_len=seq_len or task.config.seq_len, eval_batch=batch_size, what=str(target))
    model = LanguageModel(recipe)
    ckpt.load_model_weights(target, model)
    return LoadedRun(model=model.to(dev).eval(), recipe=recipe, step=int(state.get("step", 0)),
                     task=task, checkpoint=target, device=dev)


def write_run_recipe(out_dir: Path, recipe: Recipe) -> Path:
    """Record the effective recipe (every default filled in) as ``OUT/recipe.yaml``."""
    path = Path(out_dir) / RECIPE_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(recipe_yaml(recipe))
    tmp.replace(path)
    return path


def recipe_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, default_flow_style=None)
