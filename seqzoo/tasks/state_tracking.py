"""State tracking: word problems on finite groups (Merrill, Petty & Sabharwal 2024, "The
Illusion of State in State-Space Models"; Liu et al. 2023, "Transformers Learn Shortcuts
to Automata").

Each input token is a group element; the target at every position is the product of the
prefix so far. ``parity`` is the group Z_2 (inputs are bits, targets the running XOR) — a
diagonal recurrence with a negative eigenvalue can track it. ``s5`` is the symmetric group
on 5 elements (120 permutations); its word problem is NC¹-complete (Barrington), so no
fixed-depth transformer or diagonal SSM solves it at every length. Accuracy is per
position; testing at a longer ``seq_len`` measures length generalisation.
"""

from __future__ import annotations

import itertools
from functools import cached_property

import torch
from pydantic import Field
from torch import Tensor

from seqzoo.limits import MAX_SEQ_LEN
from seqzoo.tasks.base import Task, TaskConfig, register_task


class StateTrackingConfig(TaskConfig):
    seq_len: int = Field(64, ge=1, le=MAX_SEQ_LEN)


@register_task
class Parity(Task):
    """Z_2: x_t ∈ {0, 1}, y_t = x_1 ⊕ … ⊕ x_t."""

    name = "parity"
    Config = StateTrackingConfig
    metrics = ("accuracy", "loss")

    @property
    def vocab_size(self) -> int:
        return 2

    def make_batch(self, generator: torch.Generator, batch_size: int, *, split: str,
                   seq_len: int | None = None) -> tuple[Tensor, Tensor]:
        t = seq_len or self.config.seq_len
        bits = torch.randint(0, 2, (batch_size, t), generator=generator)
        return bits, bits.cumsum(-1) % 2


def permutations(n: int) -> Tensor:
    """All permutations of range(n) in lexicographic order: (n!, n); row 0 is the identity."""
    return torch.tensor(list(itertools.permutations(range(n))), dtype=torch.long)


def multiplication_table(perms: Tensor) -> Tensor:
    """table[a, b] = index of the composition a ∘ b, the permutation i ↦ a[b[i]]: (n!, n!)."""
    count = len(perms)
    composed = perms[:, None, :].expand(-1, count, -1).gather(2, perms[None, :, :].expand(count, -1, -1))
    # composed[a, b, i] = perms[a, perms[b, i]]  # (n!, n!, n)
    index = {tuple(p): i for i, p in enumerate(perms.tolist())}
    flat = composed.reshape(count * count, -1).tolist()  # (n!·n!, n)
    return torch.tensor([index[tuple(row)] for row in flat], dtype=torch.long).view(count, count)


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
