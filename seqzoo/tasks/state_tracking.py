"""State tracking: word problems on finite groups (Merrill, Petty & Sabharwal 2024, "The
Illusion of State in State-Space Models"; Liu et al. 2023, "Transformers Learn Shortcuts
to Automata").

Each input token is a group element; the target at every position is the product of the
prefix so far. ``parity`` is the group Z_2 (inputs are bits, targets the running XOR) — a
diagonal recurrence with a negative eigenvalue can track it (Grazzi et al. 2024, "Unlocking
State-Tracking in Linear RNNs Through Negative Eigenvalues", sec. 5 and table 3: trained on
lengths 3-40, tested on 40-256). For that protocol ``min_seq_len`` draws each training
sequence's length uniformly in [min_seq_len, seq_len] (positions past it are unscored), and
``score: last`` scores only the final position of held-out sequences, so a test at 256 tokens
measures the state after 256 bits rather than a mean dominated by the easy early positions.
Its headline ``scaled_accuracy`` is (accuracy − 1/2) / (1 − 1/2): 0 at chance, 1 when solved
(the scaling of Delétang et al. 2023, which Grazzi et al. report). ``s5`` is the symmetric group
on 5 elements (120 permutations); its word problem is NC¹-complete (Barrington), so no
fixed-depth transformer or diagonal SSM solves it at every length. Accuracy is per
position; testing at a longer ``seq_len`` measures length generalisation.
"""

from __future__ import annotations

import itertools
from functools import cached_property

import torch
from typing import Literal

from pydantic import Field, model_validator
from torch import Tensor

from seqzoo.limits import MAX_SEQ_LEN
from seqzoo.tasks.base import IGNORE, Task, TaskConfig, register_task


class StateTrackingConfig(TaskConfig):
    seq_len: int = Field(64, ge=1, le=MAX_SEQ_LEN)


class ParityConfig(StateTrackingConfig):
    min_seq_len: int | None = Field(None, ge=1, le=MAX_SEQ_LEN, description=(
        "training sequences have a length drawn uniformly in [min_seq_len, seq_len] (the rest unscored); "
        "default: all seq_len"))
    score: Literal["all", "last"] = Field("all", description=(
        "held-out positions scored: every position, or only the last (the state after the whole sequence)"))

    @model_validator(mode="after")
    def _lengths(self) -> "ParityConfig":
        if self.min_seq_len is not None and self.min_seq_len > self.seq_len:
            raise ValueError(f"min_seq_len ({self.min_seq_len}) must be at most seq_len ({self.seq_len})")
        return self


@register_task
class Parity(Task):
    """Z_2: x_t ∈ {0, 1}, y_t = x_1 ⊕ … ⊕ x_t."""

    name = "parity"
    Config = ParityConfig
    metrics = ("scaled_accuracy", "accuracy", "loss")
    chance = 0.5

    @property
    def vocab_size(self) -> int:
        return 2

    def make_batch(self, generator: torch.Generator, batch_size: int, *, split: str,
                   seq_len: int | None = None) -> tuple[Tensor, Tensor]:
        t = seq_len or self.config.seq_len
        bits = torch.randint(0, 2, (batch_size, t), generator=generator)
        targets = bits.cumsum(-1) % 2
        if split == "train" and self.config.min_seq_len is not None:
            lengths = torch.randint(self.config.min_seq_len, t + 1, (batch_size, 1), generator=generator)  # (B, 1)
            targets = targets.masked_fill(torch.arange(t) >= lengths, IGNORE)
        elif split != "train" and self.config.score == "last":
            targets[:, :-1] = IGNORE
        return bits, targets

    def report(self, loss: float, accuracy: float) -> dict[str, float]:
        return {"scaled_accuracy": (accuracy - self.chance) / (1 - self.chance), "accuracy": accuracy, "loss": loss}


def permutations(n: int) -> Tensor:
    """All permutations of range(n) in lexicographic order: (n!, n); row 0 is the identity."""
    # On the CPU whatever the default device: the table is data, and a model built on the
    # meta device (parameter counts, the memory budget) asks for the vocabulary it gives.
    return torch.tensor(list(itertools.permutations(range(n))), dtype=torch.long, device="cpu")


def multiplication_table(perms: Tensor) -> Tensor:
    """table[a, b] = index of the composition a ∘ b, the permutation i ↦ a[b[i]]: (n!, n!)."""
    count = len(perms)
    composed = perms[:, None, :].expand(-1, count, -1).gather(2, perms[None, :, :].expand(count, -1, -1))
    # composed[a, b, i] = perms[a, perms[b, i]]  # (n!, n!, n)
    index = {tuple(p): i for i, p in enumerate(perms.tolist())}
    flat = composed.reshape(count * count, -1).tolist()  # (n!·n!, n)
    return torch.tensor([index[tuple(row)] for row in flat], dtype=torch.long, device=perms.device).view(count, count)


@register_task
class S5(Task):
    """S_5 word problem: x_t is one of the 120 permutations, y_t = x_t ∘ x_{t-1} ∘ … ∘ x_1
    (the state after applying x_1 first, then x_2, …)."""

    name = "s5"
    Config = StateTrackingConfig
    metrics = ("accuracy", "loss")
    degree = 5

    @cached_property
    def table(self) -> Tensor:
        return multiplication_table(permutations(self.degree))

    @property
    def vocab_size(self) -> int:
        return len(self.table)

    def make_batch(self, generator: torch.Generator, batch_size: int, *, split: str,
                   seq_len: int | None = None) -> tuple[Tensor, Tensor]:
        t = seq_len or self.config.seq_len
        inputs = torch.randint(0, self.vocab_size, (batch_size, t), generator=generator)
        targets = torch.empty_like(inputs)
        state = torch.zeros(batch_size, dtype=torch.long)  # the identity
        for i in range(t):  # a scan over the group: state_t = x_t ∘ state_{t-1}
            state = self.table[inputs[:, i], state]
            targets[:, i] = state
        return inputs, targets
