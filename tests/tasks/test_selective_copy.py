"""Selective copying (Mamba §3.1): the marked positions hold the data tokens in order."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from seqzoo.tasks import IGNORE, build_task


@given(seq_len=st.integers(8, 64), n=st.integers(1, 4), step=st.integers(0, 10_000), longer=st.integers(0, 32))
def test_targets_are_the_context_tokens_in_order(seq_len, n, step, longer):
    task = build_task({"type": "selective_copy", "seq_len": seq_len, "num_tokens": n, "vocab_size": 10})
    inputs, targets = next(task.eval_batches(1, 4, seq_len=seq_len + longer))
    t = seq_len + longer
    assert inputs.shape == targets.shape == (4, t)
    for x, y in zip(inputs.tolist(), targets.tolist()):
        context, markers = x[:t - n], x[t - n:]
        assert markers == [1] * n and 1 not in context
        data = [tok for tok in context if tok != 0]  # blanks removed, order kept
        assert len(data) == n and all(2 <= tok < 10 for tok in data)
        assert y[:t - n] == [IGNORE] * (t - n) and y[t - n:] == data


def test_spacing_varies_between_examples():
    task = build_task({"type": "selective_copy", "seq_len": 64, "num_tokens": 4})
    inputs, _ = task.train_batch(0, 16)
    layouts = {tuple((row[:60] != 0).nonzero().flatten().tolist()) for row in inputs}
    assert len(layouts) > 8  # not a fixed spacing: an LTI filter cannot solve it
    assert torch.equal(task.train_batch(0, 16)[0], inputs)
