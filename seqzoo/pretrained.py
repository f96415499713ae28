"""A pretrained directory: ``LanguageModel.save_pretrained(dir)`` / ``from_pretrained(dir)``.

The layout is Hugging Face's, so ``transformers.AutoModelForCausalLM.from_pretrained(dir)``
loads the same directory once ``seqzoo.hf`` is imported (no ``trust_remote_code``):

* ``config.json``: ``model_type: seqzoo``, the validated recipe, and the few fields HF tools
  read (vocab_size, hidden_size, num_hidden_layers, tie_word_embeddings, dtype);
* ``model.safetensors``: the weights under the ``model.`` prefix (the LanguageModel inside
  ``seqzoo.hf.SeqzooForCausalLM``), a tied head stored once (as the embedding);
* ``tokenizer.json`` + ``tokenizer_config.json`` for text models (``bytes`` and ``text``
  tasks) when the ``tokenizers`` package is installed, for ``AutoTokenizer``.

JSON and safetensors only: loading never unpickles or executes anything.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from seqzoo.errors import CheckpointError
from seqzoo.recipes import Recipe, recipe_from_dict

if TYPE_CHECKING:
    from seqzoo.models.lm import LanguageModel

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MODEL_TYPE = "seqzoo"
PREFIX = "model."  # SeqzooForCausalLM.model is the LanguageModel


def config_dict(recipe: Recipe, *, vocab_size: int, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The config.json content for ``recipe`` (also what ``seqzoo.hf.SeqzooConfig`` holds)."""
    from seqzoo import __version__

    return {"model_type": MODEL_TYPE, "architectures": ["SeqzooForCausalLM"], "seqzoo_version": __version__,
            "recipe": recipe.model_dump(mode="json"), "vocab_size": vocab_size,
            "hidden_size": recipe.model.d_model, "num_hidden_layers": recipe.model.n_layers,
            "tie_word_embeddings": recipe.model.tie_embeddings, "dtype": str(dtype).removeprefix("torch.")}


def save_pretrained(model: "LanguageModel", out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = model.embed.weight.dtype
    (out / CONFIG_FILE).write_text(json.dumps(config_dict(model.recipe, vocab_size=model.vocab_size, dtype=dtype),
                                              indent=1))
    weights = {PREFIX + k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.recipe.model.tie_embeddings:
        weights.pop(PREFIX + "head.weight")  # the same tensor as the embedding; re-tied on load
    save_file(weights, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    _save_tokenizer(model, out)
    return out


def _save_tokenizer(model: "LanguageModel", out: Path) -> None:
    from seqzoo.tasks import build_task

    task = build_task(model.recipe.task)
    if not hasattr(task, "decode"):
        return  # not a text task (e.g. MQAR): token ids have no text
    try:
        from seqzoo.tokenizer import byte_tokenizer, save_for_transformers

        tok = getattr(task, "tokenizer", None) or byte_tokenizer()
    except Exception as err:  # noqa: BLE001 - only the optional tokenizer file is skipped
        warnings.warn(f"{out}: no tokenizer.json written ({err}); the model itself is complete", stacklevel=3)
        return
    save_for_transformers(tok, out, model_max_length=model.recipe.task.get("seq_len", 256))


def read_config(path: str | Path) -> tuple[dict[str, Any], Recipe]:
    """(config.json as a dict, its validated recipe) of a pretrained directory."""
    cfg_path = Path(path) / CONFIG_FILE
    if not cfg_path.is_file():
        raise CheckpointError(str(path), f"not a pretrained directory (no {CONFIG_FILE})")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(str(cfg_path), f"corrupt JSON: {err}") from None
    if not isinstance(config, dict) or config.get("model_type") != MODEL_TYPE:
        got = config.get("model_type") if isinstance(config, dict) else type(config).__name__
        raise CheckpointError(str(cfg_path), f"expected {MODEL_TYPE!r}, got {got!r}", key="model_type")
    if "recipe" not in config:
        raise CheckpointError(str(cfg_path), "no recipe stored", key="recipe")
    return config, recipe_from_dict(config["recipe"], path=f"{cfg_path}: recipe")


def from_pretrained(path: str | Path, *, device: str | torch.device = "cpu") -> "LanguageModel":
    from seqzoo.models.lm import LanguageModel
    from seqzoo.train import checkpoint as ckpt

    config, recipe = read_config(path)
    model = LanguageModel(recipe)
    weights_path = Path(path) / WEIGHTS_FILE
    ckpt.assign_weights(model, model_weights(weights_path, model), source=weights_path)
    return model.to(device).eval()


def model_weights(path: Path, model: "LanguageModel") -> dict[str, torch.Tensor]:
    """The LanguageModel's state dict from a pretrained ``model.safetensors``: the ``model.``
    prefix dropped (files HF's save_pretrained wrote have it too) and a tied head re-added."""
    if not path.is_file():
        raise CheckpointError(str(path), "missing file")
    try:
        raw = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(str(path), f"corrupt safetensors file: {err}") from None
    weights = {k.removeprefix(PREFIX): v for k, v in raw.items()}
    if model.recipe.model.tie_embeddings and "head.weight" not in weights and "embed.weight" in weights:
        weights["head.weight"] = weights["embed.weight"]
    return weights
