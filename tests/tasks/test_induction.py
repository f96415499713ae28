"""Induction heads: ... A B ... A -> B, the trigger unique apart from the query."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from seqzoo.tasks import IGNORE, build_task


@given(seq_len=st.integers(6, 96), vocab=st.integers(3, 40), step=st.integers(0, 10_000))
def test_target_follows_the_first_trigger(seq_len, vocab, step):
    task = build_task({"type": "induction", "seq_len": seq_len, "vocab_size": vocab})
    inputs, targets = task.train_batch(step, 4)
    assert inputs.shape == targets.shape == (4, seq_len) and inputs.max() < vocab
    for x, y in zip(inputs.tolist(), targets.tolist()):
        assert x.count(0) == 2 and x[-1] == 0
        first = x.index(0)
        assert first + 1 < seq_len // 2 + 1
        assert y[:-1] == [IGNORE] * (seq_len - 1) and y[-1] == x[first + 1] != 0
