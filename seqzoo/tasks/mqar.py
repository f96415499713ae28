"""Multi-query associative recall (Arora et al. 2023, "Zoology").

Each example opens with ``num_kv_pairs`` key-value pairs (keys from the lower half of the
vocabulary, values from the upper half, so they are disjoint); the rest of the sequence
holds random filler tokens and, at power-law distributed distances, the keys again. The
model must emit the key's value right after each repeated key; the loss is taken only at
those answer positions, and accuracy is the share of answers predicted exactly.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import Tensor

from seqzoo.limits import MAX_SEQ_LEN, MAX_VOCAB
from seqzoo.tasks.base import IGNORE, Task, TaskConfig, register_task


class MQARConfig(TaskConfig):
    seq_len: int = Field(128, ge=1, le=MAX_SEQ_LEN)
    vocab_size: int = Field(256, ge=8, le=MAX_VOCAB)
    num_kv_pairs: int = Field(8, ge=1, le=MAX_SEQ_LEN)
    power_a: float = Field(0.01, gt=0, le=10, description="query gaps drawn with p(g) ∝ g^(a-1)")
    random_non_queries: bool = True

    @model_validator(mode="after")
    def _fits(self) -> "MQARConfig":
        if 4 * self.num_kv_pairs > self.seq_len:
            raise ValueError(f"num_kv_pairs={self.num_kv_pairs} needs seq_len ≥ {4 * self.num_kv_pairs}")
        if self.num_kv_pairs > self.vocab_size // 2 - 1:
            raise ValueError(f"num_kv_pairs={self.num_kv_pairs} exceeds the {self.vocab_size // 2 - 1} distinct keys")
        return self


@register_task
class MQAR(Task):
    name = "mqar"
    Config = MQARConfig
    metrics = ("accuracy", "loss")

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def make_batch(self, generator: torch.Generator, batch_size: int, *, split: str,
                   seq_len: int | None = None) -> tuple[Tensor, Tensor]:
        cfg = self.config
        t = (seq_len or cfg.seq_len) + 1  # one extra token: inputs/targets are shifted views
        n, half = cfg.num_kv_pairs, cfg.vocab_size // 2
        context = 2 * n
        # Keys drawn without replacement from [1, half), values from [half, vocab).
        keys = torch.rand(batch_size, half - 1, generator=generator).argsort(-1)[:, :n] + 1  # (B, n)
        values = torch.randint(half, cfg.vocab_size, (batch_size, n), generator=generator)  # (B, n)
        kvs = torch.stack([keys, values], -1).flatten(1)  # (B, 2n): k1 v1 k2 v2 ...
        # Query slots sit at even offsets after the context; gaps follow a power law.
        slots = (t - context) // 2
        gaps = torch.arange(1, slots + 1, dtype=torch.float64)
        weights = (cfg.power_a * gaps ** (cfg.power_a - 1)).expand(batch_size, -1)
        chosen = torch.multinomial(weights, n, replacement=False, generator=generator)  # (B, n)
        queries = torch.zeros(batch_size, t - context, dtype=torch.long)
        answers = torch.full((batch_size, t - context), IGNORE, dtype=torch.long)
        queries.scatter_(1, chosen * 2, keys)
        answers.scatter_(1, chosen * 2 + 1, values)
        seq = torch.cat([kvs, queries], 1)  # (B, t)
        labels = torch.cat([torch.full((batch_size, context), IGNORE, dtype=torch.long), answers], 1)
        if cfg.random_non_queries:
            filler = torch.randint(0, cfg.vocab_size, seq.shape, generator=generator)
            empty = seq == 0
            empty[:, :context] = False
            seq = torch.where(empty, filler, seq)
        return seq[:, :-1], labels[:, 1:]
