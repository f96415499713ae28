"""Tasks: deterministic batches, MQAR's structure (Zoology), byte LM split by file."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from seqzoo.errors import SeqzooError
from seqzoo.tasks import IGNORE, build_task


@given(seq_len=st.integers(16, 96), pairs=st.integers(1, 4), step=st.integers(0, 1000))
def test_mqar_answers_are_the_values_of_repeated_keys(seq_len, pairs, step):
    task = build_task({"type": "mqar", "seq_len": seq_len, "num_kv_pairs": pairs, "vocab_size": 64})
    inputs, targets = task.train_batch(step, 3)
    assert inputs.shape == targets.shape == (3, seq_len)
    for x, y in zip(inputs, targets):
        keys, values = x[0:2 * pairs:2], x[1:2 * pairs:2]
        assert (keys < 32).all() and (keys >= 1).all() and (values >= 32).all()
        assert len(set(keys.tolist())) == pairs
        pos = (y != IGNORE).nonzero().flatten()
        assert len(pos) == pairs and (pos >= 2 * pairs).all()
        lookup = dict(zip(keys.tolist(), values.tolist()))
        for p in pos.tolist():
            assert y[p].item() == lookup[x[p].item()]  # after key x[p] comes its value


def test_batches_are_deterministic_per_step_and_distinct_across_steps():
    task = build_task({"type": "mqar", "seq_len": 64, "num_kv_pairs": 4})
    a, b, c = task.train_batch(7, 4), task.train_batch(7, 4), task.train_batch(8, 4)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    shards = [task.train_batch(7, 4, rank=r, world_size=2)[0] for r in range(2)]
    assert torch.equal(torch.cat(shards), a[0])


def test_mqar_query_gaps_favour_short_distances():
    task = build_task({"type": "mqar", "seq_len": 256, "num_kv_pairs": 4, "power_a": 0.01})
    _, targets = task.train_batch(0, 256)
    pos = (targets != IGNORE).nonzero()[:, 1].float()
    offsets = pos - 8
    assert (offsets < 124).float().mean() > 0.5  # a power law concentrates near the context


def test_bytes_split_by_file_and_bpb(tmp_path):
    for i in range(40):
        (tmp_path / f"f{i}.py").write_text(f"# file {i}\n" + "x = 1\n" * 50)
    task = build_task({"type": "bytes", "path": str(tmp_path), "seq_len": 16, "eval_percent": 20})
    train, held = task.splits["train"], task.splits["eval"]
    assert train.numel() > held.numel() > 0
    x, y = task.train_batch(0, 2)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert task.report(math.log(2), 0.5)["bpb"] == pytest.approx(1.0)


def test_bytes_default_corpus_is_the_stdlib():
    task = build_task({"type": "bytes", "seq_len": 32, "max_bytes": 100_000})
    x, _ = task.train_batch(0, 1)
    assert x.max() < 256 and task.splits["eval"].numel() > 1000


def test_bytes_missing_path_is_clear(tmp_path):
    task = build_task({"type": "bytes", "path": str(tmp_path / "nope")})
    with pytest.raises(SeqzooError, match="does not exist"):
        task.train_batch(0, 1)
