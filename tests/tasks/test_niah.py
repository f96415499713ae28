"""S-NIAH: one needle in a noise haystack, answers after the query, depths on a grid."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from seqzoo.errors import SeqzooError
from seqzoo.mixers.base import ConfigError
from seqzoo.tasks import IGNORE, build_task


@given(seq_len=st.integers(16, 80), value_len=st.integers(1, 3), step=st.integers(0, 10_000),
       split=st.sampled_from(["train", "eval"]))
def test_the_answer_is_the_needles_value(seq_len, value_len, step, split):
    task = build_task({"type": "niah", "seq_len": seq_len, "value_len": value_len, "num_keys": 8})
    gen = task._generator(0, step)
    inputs, targets = task.make_batch(gen, 5, split=split)
    assert inputs.shape == targets.shape == (5, seq_len)
    assert inputs.max() < task.vocab_size
    for x, y in zip(inputs.tolist(), targets.tolist()):
        needle = x.index(2)  # NEEDLE
        assert x.count(2) == 1 and x.count(1) == 1  # one needle, one query
        key, value = x[needle + 1], x[needle + 2:needle + 2 + value_len]
        assert x.count(key) == 2  # in the needle and in the query only: noise never collides
        query = x.index(1)
        assert x[query + 1] == key and query == seq_len + 1 - (value_len + 2)
        answers = [(i, t) for i, t in enumerate(y) if t != IGNORE]
        assert [i for i, _ in answers] == list(range(seq_len - value_len, seq_len))
        assert [t for _, t in answers] == value


def test_eval_places_needles_on_the_depth_grid():
    task = build_task({"type": "niah", "seq_len": 64, "depths": [0.0, 0.5, 1.0]})
    inputs, _ = next(task.eval_batches(1, 6, seq_len=128))
    starts = (inputs == 2).nonzero()[:, 1].tolist()  # (B,) needle positions
    hay = 129 - 3  # t + 1 tokens minus the query tail (value_len 1)
    assert starts == [0, round(0.5 * (hay - 3)), hay - 3] * 2
    a, b = next(task.eval_batches(1, 6, seq_len=128)), next(task.eval_batches(1, 6, seq_len=128))
    assert torch.equal(a[0], b[0])


def test_bad_settings_name_the_key():
    with pytest.raises(ConfigError, match="depths"):
        build_task({"type": "niah", "depths": [1.5]})
    with pytest.raises(ConfigError, match="seq_len"):
        build_task({"type": "niah", "seq_len": 4, "value_len": 2})
    with pytest.raises(SeqzooError):
        build_task({"type": "niah", "needle": 3})
