"""The one generic language model: embed -> blocks -> final norm -> head.

Every mixer and hybrid is served by this class, built from a recipe; there are no
per-architecture model files. Decoding state is a tuple with one entry per layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from seqzoo.blocks.stack import build_blocks
from seqzoo.layers.norms import RMSNorm
from seqzoo.recipes import Recipe

ModelState = tuple[Any, ...]  # one mixer state per layer


class LanguageModel(nn.Module):
    def __init__(self, recipe: Recipe) -> None:
        super().__init__()
        spec = recipe.model
        self.recipe = recipe
        self.vocab_size = recipe.vocab_size()
        self.embed = nn.Embedding(self.vocab_size, spec.d_model)
        self.blocks = build_blocks(recipe)
        self.norm = RMSNorm(spec.d_model, eps=spec.norm_eps)
        self.head = nn.Linear(spec.d_model, self.vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=spec.init_std)
        if spec.tie_embeddings:
            self.head.weight = self.embed.weight
        else:
            nn.init.normal_(self.head.weight, std=spec.init_std)

    # -- the contract -------------------------------------------------------------------
    def init_state(self, batch_size: int, *, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> ModelState:
        device = device or self.embed.weight.device
        dtype = dtype or self.embed.weight.dtype
        return tuple(b.mixer.init_state(batch_size, device=device, dtype=dtype) for b in self.blocks)

    def forward(self, tokens: Tensor, state: ModelState | None = None) -> tuple[Tensor, ModelState]:
        """tokens: (B, T) long -> logits (B, T, vocab), state after the last token."""
        x = self.embed(tokens)  # (B, T, D)
        states = state if state is not None else (None,) * len(self.blocks)
        new_states = []
        for block, s in zip(self.blocks, states):
            x, s = block(x, s)
            new_states.append(s)
        return self.head(self.norm(x)), tuple(new_states)

    def step(self, tokens: Tensor, state: ModelState) -> tuple[Tensor, ModelState]:
        """tokens: (B,) long -> logits (B, vocab); one token of decoding."""
        x = self.embed(tokens)  # (B, D)
        new_states = []
        for block, s in zip(self.blocks, state):
            x, s = block.step(x, s)
            new_states.append(s)
        return self.head(self.norm(x)), tuple(new_states)

    @torch.no_grad()
    def generate(self, prompt: Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, *, generator: torch.Generator | None = None) -> Tensor:
        """Prefill the prompt (B, T) with one forward, then decode with ``step``.
        Returns (B, T + max_new_tokens). temperature 0 means greedy."""
        from seqzoo.models.generation import sample_next

        if prompt.ndim == 1:
            prompt = prompt[None]
        logits, state = self(prompt)
        out = [prompt]
        nxt = sample_next(logits[:, -1], temperature, top_k, generator)
        for i in range(max_new_tokens):
            out.append(nxt[:, None])
            if i == max_new_tokens - 1:
                break
            logits, state = self.step(nxt, state)
            nxt = sample_next(logits, temperature, top_k, generator)
        return torch.cat(out, 1)

    # -- saving and loading (safetensors + JSON; see seqzoo.pretrained) ----------------------
    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write config.json, model.safetensors (and a tokenizer for text models) into
        ``out_dir``; ``transformers.AutoModelForCausalLM`` reads it too (``import seqzoo.hf``)."""
        from seqzoo.pretrained import save_pretrained

        return save_pretrained(self, out_dir)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | torch.device = "cpu") -> "LanguageModel":
        """The model a ``save_pretrained`` directory holds, in eval mode; no code is executed."""
        from seqzoo.pretrained import from_pretrained

        return from_pretrained(path, device=device)

    # -- introspection ------------------------------------------------------------------
    def num_params(self, *, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embeddings else n

    def describe(self) -> str:
        """A markdown table of the layers: mixer, backend, parameters, state size; then the
        gate ranges and step bound of every Titans memory."""
        rows = ["| layer | entry | mixer | backend | mixer params | block params | state (per sequence) |",
                "|---:|---|---|---|---:|---:|---:|"]
        for i, block in enumerate(self.blocks):
            m = block.mixer
            rows.append(f"| {i} | {getattr(m, 'entry', '')} | {m.name} | {m.backend} | "
                        f"{_count(m):,} | {_count(block):,} | {m.state_size(1):,} |")
        gates = [f"* layer {i}: {module.gate_ranges()}" for i, block in enumerate(self.blocks)
                 for module in block.mixer.modules() if hasattr(module, "gate_ranges")]
        if gates:
            rows += ["", "Titans memory gates (the step bound R: no token moves the memory weights further):", *gates]
        total = self.num_params()
        rows.append(f"\n{self.recipe.name}: {total:,} parameters "
                    f"({self.num_params(exclude_embeddings=True):,} without embeddings), "
                    f"d_model={self.recipe.model.d_model}, vocab={self.vocab_size}")
        return "\n".join(rows)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
