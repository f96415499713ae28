"""Selective copying (Gu & Dao 2023, "Mamba", §3.1; after Arjovsky et al.'s copying task).

``num_tokens`` data tokens sit at random positions of a context otherwise filled with a
blank token; then come ``num_tokens`` marker tokens, and at each marker the model must emit
the data tokens in their original order. Unlike plain copying the spacing varies, so a
time-invariant (LTI) model cannot solve it: the model must select content by value. The
loss is taken only at the marker positions; accuracy is the share of tokens copied exactly.
A longer ``seq_len`` at test time widens the context (more blanks, same number of tokens).
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import Tensor

from seqzoo.limits import MAX_SEQ_LEN, MAX_VOCAB
from seqzoo.tasks.base import IGNORE, Task, TaskConfig, register_task

BLANK, MARKER = 0, 1


class SelectiveCopyConfig(TaskConfig):
    seq_len: int = Field(128, ge=1, le=MAX_SEQ_LEN)
    num_tokens: int = Field(16, ge=1, le=MAX_SEQ_LEN, description="data tokens to copy")
    vocab_size: int = Field(16, ge=3, le=MAX_VOCAB, description="including the blank and marker tokens")

    @model_validator(mode="after")
    def _fits(self) -> "SelectiveCopyConfig":
        if 2 * self.num_tokens > self.seq_len:
            raise ValueError(f"num_tokens={self.num_tokens} needs seq_len ≥ {2 * self.num_tokens}")
        return self


@register_task
class SelectiveCopy(Task):
    name = "selective_copy"
    Config = SelectiveCopyConfig
    metrics = ("accuracy", "loss")

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def make_batch(self, generator: torch.Generator, batch_size: int, *, split: str,
                   seq_len: int | None = None) -> tuple[Tensor, Tensor]:
        cfg = self.config
        t, n = seq_len or cfg.seq_len, cfg.num_tokens
        context = t - n
        data = torch.randint(2, cfg.vocab_size, (batch_size, n), generator=generator)  # (B, n)
        # n distinct positions of the context, kept in increasing order.
        pos = torch.rand(batch_size, context, generator=generator).argsort(-1)[:, :n].sort(-1).values  # (B, n)
        inputs = torch.full((batch_size, t), BLANK, dtype=torch.long)
        inputs.scatter_(1, pos, data)
        inputs[:, context:] = MARKER
        targets = torch.full((batch_size, t), IGNORE, dtype=torch.long)
        targets[:, context:] = data
        return inputs, targets
