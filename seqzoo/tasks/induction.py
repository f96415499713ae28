"""Induction heads (Olsson et al. 2022; the synthetic of Fu et al. 2023, "H3", and Poli et
al. 2023, "Hyena").

A sequence of random tokens contains one trigger token followed by a target token, both in
the first half; the sequence ends with the trigger again and the model must predict the
token that followed it the first time ("... A B ... A → B"). The trigger never appears
anywhere else; the loss is taken only at the final position.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from seqzoo.limits import MAX_SEQ_LEN, MAX_VOCAB
from seqzoo.tasks.base import IGNORE, Task, TaskConfig, register_task

TRIGGER = 0


class InductionConfig(TaskConfig):
    seq_len: int = Field(128, ge=6, le=MAX_SEQ_LEN)
    vocab_size: int = Field(32, ge=3, le=MAX_VOCAB, description="the trigger token plus the content tokens")


@register_task
class Induction(Task):
    name = "induction"
    Config = InductionConfig
    metrics = ("accuracy", "loss")

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def make_batch(self, generator: torch.Generator, batch_size: int, *, split: str,
                   seq_len: int | None = None) -> tuple[Tensor, Tensor]:
        t = seq_len or self.config.seq_len
        inputs = torch.randint(1, self.config.vocab_size, (batch_size, t), generator=generator)
        # The first trigger lands in [0, t/2 - 1) so its target also lies in the first half.
        first = torch.randint(0, max(1, t // 2 - 1), (batch_size,), generator=generator)  # (B,)
        rows = torch.arange(batch_size)
        inputs[rows, first] = TRIGGER
        inputs[:, -1] = TRIGGER
        targets = torch.full((batch_size, t), IGNORE, dtype=torch.long)
        targets[:, -1] = inputs[rows, first + 1]
        return inputs, targets
