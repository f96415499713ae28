"""``SeqzooConfig`` / ``SeqzooForCausalLM``: a ``transformers`` face on ``LanguageModel``.

The wrapper holds the one generic LanguageModel as ``.model`` (so weight names are
``model.<seqzoo name>``, the layout ``seqzoo.pretrained`` writes) and adds what HF tools
expect: ``forward(input_ids, labels=...) -> CausalLMOutput``-like outputs, ``generate``
with seqzoo's decode state as the cache, and ``from_pretrained`` that reads JSON and
safetensors only. Loading bypasses HF's meta-device initialisation on purpose: every
seqzoo module initialises itself (buffers included), and the checkpoint then overwrites
the weights, so no mixer needs an HF-specific ``_init_weights``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from seqzoo.errors import SeqzooError
from seqzoo.models.lm import LanguageModel, ModelState
from seqzoo.pretrained import MODEL_TYPE, config_dict, model_weights, read_config
from seqzoo.recipes import Recipe, recipe_from_dict
from seqzoo.tasks import IGNORE


class SeqzooConfig(PretrainedConfig):
    """The recipe (validated on use) plus the fields generic HF tools read."""

    model_type = MODEL_TYPE
    recipe: dict | None = None
    vocab_size: int = 256
    hidden_size: int = 128
    num_hidden_layers: int = 4
    tie_word_embeddings: bool = True
    use_cache: bool = True
    seqzoo_version: str | None = None

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> "SeqzooConfig":
        fields = config_dict(recipe, vocab_size=recipe.vocab_size())
        for key in ("model_type", "dtype"):
            fields.pop(key)
        return cls(**fields)

    def to_recipe(self) -> Recipe:
        if not self.recipe:
            raise SeqzooError("SeqzooConfig: no recipe; build it with SeqzooConfig.from_recipe(recipe)")
        return recipe_from_dict(self.recipe, path="config.json: recipe")


class SeqzooCache:
    """seqzoo's decode state (one mixer state per layer) in the place ``generate`` keeps its
    cache; a new object each step, as seqzoo states are never mutated in place."""

    is_compileable = False
    is_croppable = False  # recurrent states cannot be rolled back (no assisted decoding)

    def __init__(self, state: ModelState, *, seen_tokens: int) -> None:
        self.state = state
        self.seen_tokens = seen_tokens
        self.is_linear = tuple(False for _ in state)  # generate then slices prompts by get_seq_length()

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def __len__(self) -> int:
        return len(self.state)


@dataclasses.dataclass
class SeqzooCausalLMOutput(ModelOutput):
    loss: Tensor | None = None
    logits: Tensor | None = None
    cache: SeqzooCache | None = None


class SeqzooForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = SeqzooConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _tied_weights_keys = {"model.head.weight": "model.embed.weight"}
    _is_stateful = True  # generate: no assisted decoding, which needs to roll a cache back
    _supports_param_buffer_assignment = False

    def __init__(self, config: SeqzooConfig) -> None:
        super().__init__(config)
        self.model = LanguageModel(config.to_recipe())
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        pass  # seqzoo modules initialise themselves (mixer-specific schemes, e.g. Mamba's A and dt)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is seqzoo's own state, made by forward

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.head

    # -- forward / generate -------------------------------------------------------------
    def forward(self, input_ids: Tensor | None = None, cache: SeqzooCache | None = None,
                attention_mask: Tensor | None = None, labels: Tensor | None = None, use_cache: bool | None = None,
                inputs_embeds: Tensor | None = None, past_key_values: SeqzooCache | None = None,
                return_dict: bool | None = None, **kwargs: Any) -> SeqzooCausalLMOutput:
        """input_ids: (B, T) -> logits (B, T, V); with ``cache`` the tokens continue its
        sequences (one token: the recurrent ``step``). ``labels`` as in HF: shifted inside."""
        if inputs_embeds is not None or input_ids is None:
            raise NotImplementedError("seqzoo models take input_ids only (no inputs_embeds)")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise NotImplementedError("padded batches are not supported: seqzoo's recurrent mixers have no "
                                      "attention mask; pass unpadded prompts (e.g. one at a time)")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, SeqzooCache):
            raise TypeError(f"cache: expected a SeqzooCache (from a previous forward), got {type(cache).__name__}")
        state = cache.state if cache is not None else None
        if state is not None and input_ids.shape[1] == 1:
            logits, state = self.model.step(input_ids[:, 0], state)  # (B, V): the decode path
            logits = logits[:, None]  # (B, 1, V)
        else:
            logits, state = self.model(input_ids, state)  # (B, T, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        seen = (cache.seen_tokens if cache is not None else 0) + input_ids.shape[1]
        return SeqzooCausalLMOutput(loss=loss, logits=logits,
                                    cache=SeqzooCache(state, seen_tokens=seen) if use_cache else None)

    def _reorder_cache(self, cache: SeqzooCache, beam_idx: Tensor) -> SeqzooCache:
        raise NotImplementedError("beam search is not supported: seqzoo mixer states have no common batch "
                                  "layout to reorder; use greedy or sampling")

    # -- loading ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *model_args: Any,
                        config: SeqzooConfig | None = None, dtype: Any = None, torch_dtype: Any = None,
                        device_map: Any = None, subfolder: str = "", revision: str | None = None,
                        quantization_config: Any = None, **kwargs: Any) -> "SeqzooForCausalLM":
        """A seqzoo pretrained directory (or a hub repo holding one, fetched with
        huggingface_hub) as a ``SeqzooForCausalLM`` in eval mode. JSON + safetensors only."""
        if model_args:
            raise TypeError(f"unexpected positional arguments {model_args!r}")
        if quantization_config is not None:
            raise NotImplementedError("quantized loading is not supported for seqzoo models")
        path = _local_dir(pretrained_model_name_or_path, revision=revision) / subfolder
        stored, recipe = read_config(path)
        config = config if isinstance(config, SeqzooConfig) else SeqzooConfig.from_recipe(recipe)
        model = cls(config)
        weights_path = path / "model.safetensors"
        from seqzoo.train import checkpoint as ckpt

        ckpt.assign_weights(model.model, model_weights(weights_path, model.model), source=weights_path)
        target_dtype = _dtype(dtype if dtype is not None else torch_dtype, stored)
        if target_dtype != model.model.embed.weight.dtype:  # .to(dtype) casts fp64 buffers (rotary) too
            model.to(dtype=target_dtype)
        model.to(device=_device(device_map))
        model.config.name_or_path = str(pretrained_model_name_or_path)
        return model.eval()


def _local_dir(name: str | Path, *, revision: str | None) -> Path:
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(name), revision=revision, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as err:  # offline, unknown repo, no access
        raise SeqzooError(f"{name}: not a local directory and not fetchable from the Hugging Face hub "
                          f"({type(err).__name__})") from None


def _dtype(requested: Any, stored: dict[str, Any]) -> torch.dtype:
    if requested is None or requested == "auto":
        requested = stored.get("dtype", "float32") if requested == "auto" else "float32"
    if isinstance(requested, str):
        value = getattr(torch, requested.removeprefix("torch."), None)
        if not isinstance(value, torch.dtype):
            raise SeqzooError(f"dtype: expected a torch dtype name (float32, bfloat16, ...), got {requested!r}")
        return value
    return requested


def _device(device_map: Any) -> torch.device:
    if device_map is None:
        return torch.device("cpu")
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, dict) and len(set(device_map.values())) == 1:  # e.g. {"": "cpu"}
        device_map = next(iter(device_map.values()))
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    if isinstance(device_map, (str, torch.device)):
        return torch.device(device_map)
    raise NotImplementedError("device_map: seqzoo models load onto one device (a string, int or torch.device)")


def register() -> None:
    """Make ``AutoConfig`` / ``AutoModelForCausalLM`` know model_type "seqzoo" (idempotent)."""
    try:
        AutoConfig.register(MODEL_TYPE, SeqzooConfig)
    except ValueError:
        pass  # already registered
    try:
        AutoModelForCausalLM.register(SeqzooConfig, SeqzooForCausalLM)
    except ValueError:
        pass
