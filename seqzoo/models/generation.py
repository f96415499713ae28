"""Sampling helpers for ``LanguageModel.generate``."""

from __future__ import annotations

import torch
from torch import Tensor


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """logits: (B, V) -> next tokens (B,). temperature 0 = greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def bytes_text(ids: list[int]) -> str:
    """Text of byte-level token ids; an id past 255 (a model whose vocabulary is larger than
    the byte task's, e.g. the paper recipes' 32K) is not a byte and reads as U+FFFD."""
    out = bytearray()
    for i in ids:
        out += bytes([i]) if 0 <= i < 256 else "\ufffd".encode()
    return out.decode("utf-8", errors="replace")
