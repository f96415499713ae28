"""Single-needle "needle in a haystack" (S-NIAH, as in RULER: Hsieh et al. 2024, and the
BABILong / Titans long-context evaluations).

The haystack is noise: tokens drawn uniformly from a noise range that shares no token with
keys or values, so the needle is the only place the key occurs. The needle — ``NEEDLE key
v_1 .. v_L`` — sits at a depth (0 = start of the haystack, 1 = just before the query). The
sequence ends with ``QUERY key`` and the model must then emit ``v_1 .. v_L``; the loss is
taken only on those value tokens, accuracy is the share predicted exactly.

Training draws depths uniformly in [0, 1]; the held-out split places the needle at the
depths of ``depths`` (example i of a batch at ``depths[i % len(depths)]``), so a test at a
longer ``seq_len`` measures retrieval across the whole grid of depths and lengths.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import Tensor

from seqzoo.limits import MAX_SEQ_LEN, MAX_VOCAB
from seqzoo.tasks.base import IGNORE, Task, TaskConfig, register_task

QUERY, NEEDLE = 1, 2
FIRST_KEY = 3


class NIAHConfig(TaskConfig):
    seq_len: int = Field(256, ge=1, le=MAX_SEQ_LEN)
    num_keys: int = Field(32, ge=1, le=MAX_VOCAB, description="distinct needle keys")
    num_values: int = Field(32, ge=2, le=MAX_VOCAB, description="distinct value tokens")
    value_len: int = Field(1, ge=1, le=MAX_SEQ_LEN, description="value tokens per needle")
    num_noise: int = Field(64, ge=1, le=MAX_VOCAB, description="distinct haystack tokens")
    depths: tuple[float, ...] = Field((0.0, 0.25, 0.5, 0.75, 1.0), min_length=1, max_length=1024, strict=False,
                                      description="needle depths of the held-out split")

    @model_validator(mode="after")
    def _fits(self) -> "NIAHConfig":
        need = 2 * (self.value_len + 2) + 1
        if self.seq_len < need:
            raise ValueError(f"value_len={self.value_len} needs seq_len ≥ {need}")
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"depths must lie in [0, 1], got {list(self.depths)}")
        return self


@register_task
class NIAH(Task):
    name = "niah"
    Config = NIAHConfig
    metrics = ("accuracy", "loss")

    # Vocabulary: [QUERY, NEEDLE, (pad 0)], keys, values, noise — disjoint ranges.
    @property
    def _value_start(self) -> int:
        return FIRST_KEY + self.config.num_keys

    @property
    def _noise_start(self) -> int:
        return self._value_start + self.config.num_values

    @property
    def vocab_size(self) -> int:
        return self._noise_start + self.config.num_noise

    def make_batch(self, generator: torch.Generator, batch_size: int, *, split: str,
                   seq_len: int | None = None) -> tuple[Tensor, Tensor]:
        cfg = self.config
        t = (seq_len or cfg.seq_len) + 1  # inputs/targets are shifted views of t tokens
        L = cfg.value_len
        tail = L + 2  # QUERY key v_1..v_L
        hay_len = t - tail
        seq = torch.randint(self._noise_start, self.vocab_size, (batch_size, t), generator=generator)
        keys = torch.randint(FIRST_KEY, self._value_start, (batch_size,), generator=generator)  # (B,)
        values = torch.randint(self._value_start, self._noise_start, (batch_size, L), generator=generator)  # (B, L)
        if split == "train":
            depth = torch.rand(batch_size, generator=generator, dtype=torch.float64)
        else:
            grid = torch.tensor(cfg.depths, dtype=torch.float64)
            depth = grid[torch.arange(batch_size) % len(grid)]
        # The needle (L + 2 tokens) starts somewhere in [0, hay_len - (L + 2)].
        start = torch.round(depth * (hay_len - tail)).long()  # (B,)
        needle = torch.cat([torch.full((batch_size, 1), NEEDLE), keys[:, None], values], 1)  # (B, L+2)
        cols = start[:, None] + torch.arange(tail)  # (B, L+2)
        seq.scatter_(1, cols, needle)
        query = torch.cat([torch.full((batch_size, 1), QUERY), keys[:, None], values], 1)  # (B, L+2)
        seq[:, hay_len:] = query
        labels = torch.full((batch_size, t), IGNORE, dtype=torch.long)
        labels[:, t - L:] = values
        return seq[:, :-1], labels[:, 1:]
