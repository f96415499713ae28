"""bf16 autocast (the default on GPU) through the Titans engine: the neural memory and its
TTT and hybrid users train under autocast and track fp32 (found by the recipe fuzzer: the
in-place inner updates refused autocast's bf16 operands)."""

from __future__ import annotations

import pytest

import seqzoo
from seqzoo.train.loop import train
from tests.train.run_files import train_losses

# The memory op itself, TTT's inner model (LayerNorm + residual), and a hybrid around it.
MIXERS = {
    "titans": {"type": "titans", "n_heads": 2, "chunk_size": 8},
    "ttt_mlp": {"type": "ttt_mlp", "n_heads": 2, "mini_batch": 8},
    "titans_mac": {"type": "titans_mac", "n_heads": 2, "segment_len": 8, "n_persistent": 2,
                   "memory": {"type": "titans", "n_heads": 2, "chunk_size": 8}},
}


@pytest.mark.parametrize("name", list(MIXERS))
def test_titans_engine_trains_under_bf16_autocast(name, tmp_path):
    def run(precision):
        recipe = seqzoo.recipe_from_dict({
            "name": f"bf16-{name}", "model": {"d_model": 32, "n_layers": 1, "mixers": {"m": MIXERS[name]}},
            "task": {"type": "mqar", "seq_len": 24, "num_kv_pairs": 2, "vocab_size": 16},
            "train": {"steps": 1, "batch_size": 2, "eval_batches": 1, "log_every": 1, "warmup_steps": 1,
                      "device": "cpu", "precision": precision}})
        train(recipe, out_dir=tmp_path / precision, progress=False, plot=False)
        return train_losses(tmp_path / precision)

    fp32, bf16 = run("fp32"), run("bf16")
    assert [s for s, _ in bf16] == [1] and bf16 != fp32  # autocast really ran (forward and backward)
    assert [l for _, l in bf16] == pytest.approx([l for _, l in fp32], rel=3e-2)
