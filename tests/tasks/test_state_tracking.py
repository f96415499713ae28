"""State tracking: parity and S5 prefix products, checked against a plain-Python fold."""

from __future__ import annotations

import itertools

import torch
from hypothesis import given
from hypothesis import strategies as st

from seqzoo.tasks import build_task
from seqzoo.tasks.state_tracking import multiplication_table, permutations


@given(seq_len=st.integers(1, 64), step=st.integers(0, 10_000))
def test_parity_is_the_running_xor(seq_len, step):
    task = build_task({"type": "parity", "seq_len": seq_len})
    inputs, targets = task.train_batch(step, 3)
    for x, y in zip(inputs.tolist(), targets.tolist()):
        acc = 0
        for bit, want in zip(x, y):
            acc ^= bit
            assert want == acc


def test_s5_table_is_the_group_law():
    perms = [tuple(p) for p in itertools.permutations(range(5))]
    table = multiplication_table(permutations(5))
    assert table.shape == (120, 120)
    for a, b in [(0, 7), (13, 99), (119, 119), (42, 0), (5, 77)]:
        composed = tuple(perms[a][perms[b][i]] for i in range(5))
        assert perms[table[a, b]] == composed
    # A group: every row and column is a permutation of the elements, 0 is the identity.
    assert torch.equal(table.sort(1).values, torch.arange(120).expand(120, -1))
    assert torch.equal(table.sort(0).values, torch.arange(120)[:, None].expand(-1, 120))
    assert torch.equal(table[0], torch.arange(120)) and torch.equal(table[:, 0], torch.arange(120))


@given(seq_len=st.integers(1, 24), step=st.integers(0, 10_000))
def test_s5_targets_are_prefix_products(seq_len, step):
    perms = [tuple(p) for p in itertools.permutations(range(5))]
    task = build_task({"type": "s5", "seq_len": seq_len})
    assert task.vocab_size == 120
    inputs, targets = task.train_batch(step, 2)
    for x, y in zip(inputs.tolist(), targets.tolist()):
        state = tuple(range(5))
        for g, want in zip(x, y):
            state = tuple(perms[g][state[i]] for i in range(5))  # apply x_1 first, then x_2, ...
            assert perms[want] == state


def test_s5_longer_test_sequences():
    task = build_task({"type": "s5", "seq_len": 16})
    inputs, targets = next(task.eval_batches(1, 2, seq_len=40))
    assert inputs.shape == targets.shape == (2, 40)


@given(lo=st.integers(1, 40), extra=st.integers(0, 40), step=st.integers(0, 10_000))
def test_parity_variable_length_training_scores_only_each_sequences_prefix(lo, extra, step):
    from seqzoo.tasks import IGNORE

    hi = lo + extra
    task = build_task({"type": "parity", "seq_len": hi, "min_seq_len": lo})
    inputs, targets = task.train_batch(step, 16)
    lengths = (targets != IGNORE).sum(-1)
    assert lengths.min() >= lo and lengths.max() <= hi
    for x, y, n in zip(inputs.tolist(), targets.tolist(), lengths.tolist()):
        assert all(t != IGNORE for t in y[:n]) and all(t == IGNORE for t in y[n:])  # a prefix, then nothing
        assert y[:n] == [sum(x[:i + 1]) % 2 for i in range(n)]


def test_parity_last_position_scoring_and_scaled_accuracy():
    from seqzoo.errors import ConfigError
    from seqzoo.tasks import IGNORE

    task = build_task({"type": "parity", "seq_len": 8, "score": "last"})
    (inputs, targets), = task.eval_batches(1, 5, seq_len=32)
    assert inputs.shape == (5, 32) and (targets[:, :-1] == IGNORE).all()
    assert torch.equal(targets[:, -1], inputs.sum(-1) % 2)
    assert task.metrics[0] == "scaled_accuracy"
    assert task.report(0.7, 0.5)["scaled_accuracy"] == 0.0 and task.report(0.0, 1.0)["scaled_accuracy"] == 1.0
    assert task.report(0.7, 0.25)["scaled_accuracy"] == -0.5  # below chance stays visible
    try:
        build_task({"type": "parity", "seq_len": 8, "min_seq_len": 9})
    except ConfigError as err:
        assert "min_seq_len" in str(err)
    else:
        raise AssertionError("min_seq_len > seq_len was accepted")


def test_s5_trains_a_model_counted_on_the_meta_device(tmp_path):
    """The vocabulary (120) comes from the table; the trainer's memory budget and the compare
    runner build the model on the meta device to count it, which must not reach the table."""
    import seqzoo
    from seqzoo.train.loop import train

    with torch.device("meta"):
        assert build_task({"type": "s5", "seq_len": 8}).vocab_size == 120
    recipe = seqzoo.recipe_from_dict({
        "name": "s5-tiny",
        "model": {"d_model": 16, "n_layers": 1, "mixers": {"m": {"type": "attention", "n_heads": 2}}},
        "task": {"type": "s5", "seq_len": 8},
        "train": {"steps": 2, "batch_size": 2, "eval_every": 2, "eval_batches": 1, "warmup_steps": 1}})
    result = train(recipe, out_dir=tmp_path, progress=False, plot=False)
    assert result.model.vocab_size == 120
