"""The harness: metrics and checkpoints on disk, exact resume, clear checkpoint errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import seqzoo
from seqzoo.errors import CheckpointError, SeqzooError
from seqzoo.train import checkpoint as ckpt
from seqzoo.train.loop import train

RECIPE = {
    "name": "t",
    "model": {"d_model": 32, "n_layers": 2, "mixers": {"attn": {"type": "attention", "n_heads": 2}}},
    "task": {"type": "mqar", "seq_len": 32, "num_kv_pairs": 4, "vocab_size": 32},
    "train": {"steps": 8, "batch_size": 4, "eval_every": 4, "eval_batches": 2, "ckpt_every": 4,
              "log_every": 1, "warmup_steps": 2},
}


def recipe(**train_overrides):
    data = json.loads(json.dumps(RECIPE))
    data["train"].update(train_overrides)
    return seqzoo.recipe_from_dict(data)


def train_losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "train"}


def test_train_writes_metrics_checkpoint_and_plot(tmp_path):
    result = train(recipe(), out_dir=tmp_path, progress=False)
    assert set(train_losses(tmp_path)) == set(range(1, 9))
    assert "accuracy" in result.final_eval and 0 <= result.final_eval["accuracy"] <= 1
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "step-0000008"
    assert set(load_file(str(latest / "model.safetensors"))) == set(seqzoo.build_model(recipe()).state_dict())
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


class Crash(Exception):
    pass


def test_resume_continues_exactly(tmp_path):
    train(recipe(), out_dir=tmp_path / "straight", progress=False)

    def crash_after_5(step, record):
        if step == 5:
            raise Crash

    with pytest.raises(Crash):
        train(recipe(), out_dir=tmp_path / "crashed", progress=False, on_step=crash_after_5)
    assert ckpt.latest_checkpoint(tmp_path / "crashed").name == "step-0000004"
    train(recipe(), out_dir=tmp_path / "crashed", progress=False, resume=True)
    straight, resumed = train_losses(tmp_path / "straight"), train_losses(tmp_path / "crashed")
    assert straight == resumed  # bitwise on CPU, and no step logged twice


def test_refuses_to_overwrite_without_flag(tmp_path):
    train(recipe(steps=4), out_dir=tmp_path, progress=False)
    with pytest.raises(SeqzooError, match="--resume"):
        train(recipe(steps=4), out_dir=tmp_path, progress=False)
    train(recipe(steps=4), out_dir=tmp_path, progress=False, overwrite=True)


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    a = train(recipe(steps=3, grad_accum=1), out_dir=tmp_path / "a", progress=False)
    b = train(recipe(steps=3, grad_accum=2), out_dir=tmp_path / "b", progress=False)
    la, lb = train_losses(a.out_dir), train_losses(b.out_dir)
    for step in la:
        assert la[step] == pytest.approx(lb[step], rel=1e-4)


def test_corrupt_and_mismatched_checkpoints_are_reported(tmp_path):
    train(recipe(steps=4), out_dir=tmp_path, progress=False)
    latest = ckpt.latest_checkpoint(tmp_path)
    other = seqzoo.recipe_from_dict({**RECIPE, "model": {**RECIPE["model"], "d_model": 64}})
    with pytest.raises(CheckpointError, match="shape") as info:
        ckpt.load_model_weights(latest, seqzoo.build_model(other))
    assert "model.safetensors" in str(info.value)
    (latest / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="corrupt safetensors"):
        ckpt.load_model_weights(latest, seqzoo.build_model(recipe()))
    (tmp_path / "checkpoints" / "latest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt pointer"):
        ckpt.latest_checkpoint(tmp_path)


def test_lr_schedule_warmup_then_cosine():
    from seqzoo.train.optim import lr_at

    spec = recipe(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1).train
    lrs = [lr_at(s, spec) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_checkpoint_holds_no_pickle(tmp_path):
    train(recipe(steps=4), out_dir=tmp_path, progress=False)
    latest = ckpt.latest_checkpoint(tmp_path)
    names = sorted(p.name for p in latest.iterdir())
    assert names == ["model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"]
    state = json.loads((latest / "state.json").read_text())
    assert state["step"] == 4 and state["recipe"]["name"] == "t"
    assert torch.get_rng_state().dtype == load_file(str(latest / "rng.safetensors"))["torch"].dtype
