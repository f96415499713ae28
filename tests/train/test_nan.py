"""A NaN/Inf loss or gradient stops training with a clear message, before the bad update,
and leaves the last good checkpoint intact and loadable."""

from __future__ import annotations

import json

import pytest
import torch

import seqzoo
from seqzoo.train import checkpoint as ckpt
from seqzoo.train import loop
from seqzoo.train.loop import TrainingDiverged, train

RECIPE = {
    "name": "nan",
    "model": {"d_model": 16, "n_layers": 1, "mixers": {"attn": {"type": "attention", "n_heads": 2}}},
    "task": {"type": "mqar", "seq_len": 16, "num_kv_pairs": 2, "vocab_size": 16},
    "train": {"steps": 10, "batch_size": 2, "eval_every": 100, "eval_batches": 1, "ckpt_every": 4,
              "log_every": 1, "warmup_steps": 1},
}


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_loss_stops_with_the_last_good_checkpoint(tmp_path, monkeypatch, bad):
    calls = []
    real = loop.token_loss

    def poisoned(logits, targets, **kw):
        calls.append(1)
        loss = real(logits, targets, **kw)
        return loss * bad if len(calls) == 7 else loss  # the 7th training step (index 6)

    monkeypatch.setattr(loop, "token_loss", poisoned)
    recipe = seqzoo.recipe_from_dict(RECIPE)
    with pytest.raises(TrainingDiverged, match=r"loss became (nan|inf) at step 6.*step-0000004"):
        train(recipe, out_dir=tmp_path, progress=False, plot=False)
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "step-0000004" and ckpt.read_state(latest)["step"] == 4
    model = seqzoo.build_model(recipe)
    ckpt.load_model_weights(latest, model)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert max(r["step"] for r in _records(tmp_path)) == 6  # nothing logged for the bad step

    # The intact checkpoint resumes and, without the fault, trains to the end.
    monkeypatch.setattr(loop, "token_loss", real)
    result = train(recipe, out_dir=tmp_path, progress=False, resume=True, plot=False)
    assert result.steps == 10 and ckpt.latest_checkpoint(tmp_path).name == "step-0000010"


def test_non_finite_gradient_stops_before_the_update(tmp_path, monkeypatch):
    recipe = seqzoo.recipe_from_dict(RECIPE)
    real = torch.nn.utils.clip_grad_norm_
    calls = []

    def exploding(params, max_norm, **kw):
        calls.append(1)
        norm = real(params, max_norm, **kw)
        return norm * float("inf") if len(calls) == 3 else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", exploding)
    with pytest.raises(TrainingDiverged, match="gradient norm became inf at step 2.*none yet"):
        train(recipe, out_dir=tmp_path, progress=False, plot=False)
    assert ckpt.latest_checkpoint(tmp_path) is None
