"""Metrics sinks: TensorBoard scalars equal the JSONL records (also across a resume), model
telemetry reaches both, wandb gets the same scalars under one run id, clear errors."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest

import seqzoo
from seqzoo.errors import RecipeError, SeqzooError
from seqzoo.mixers.attention import Attention
from seqzoo.train.loggers import scalars
from seqzoo.train.loop import train

RECIPE = {
    "name": "log",
    "model": {"d_model": 16, "n_layers": 1, "mixers": {"attn": {"type": "attention", "n_heads": 2}}},
    "task": {"type": "mqar", "seq_len": 16, "num_kv_pairs": 2, "vocab_size": 16},
    "train": {"steps": 8, "batch_size": 2, "eval_every": 4, "eval_batches": 1, "ckpt_every": 4, "log_every": 1,
              "warmup_steps": 1, "device": "cpu", "log": ["jsonl", "tensorboard"]},
}


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def tensorboard_scalars(out) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_matches_jsonl_with_telemetry_and_resume(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    # Any module with telemetry() reports per-layer scalars (here: a weight norm).
    monkeypatch.setattr(Attention, "telemetry", lambda self: {"qkv_norm": self.qkv.weight.norm().item()},
                        raising=False)
    recipe = seqzoo.recipe_from_dict(RECIPE)

    def crash(step, record):
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(recipe, out_dir=tmp_path, progress=False, plot=False, on_step=crash)
    train(recipe, out_dir=tmp_path, progress=False, plot=False, resume=True)

    logged = records(tmp_path)
    tb = tensorboard_scalars(tmp_path)
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "memory_mb", "blocks.0.mixer/qkv_norm"):
        expect = [(r["step"], np.float32(r[key])) for r in logged if r["split"] == "train"]
        assert [s for s, _ in expect] == list(range(1, 9)), key
        # Steps 5-6 of the interrupted run were purged: each step appears once, as resumed.
        assert tb[f"train/{key}"] == expect, key
    assert all(r["memory_mb"] > 0 for r in logged if r["split"] == "train")
    assert [s for s, _ in tb["eval/accuracy"]] == [0, 4, 8]


def test_wandb_gets_the_same_scalars_under_one_run_id(tmp_path, monkeypatch):
    calls: list[tuple] = []

    class Run:
        def log(self, values, step):
            calls.append(("log", step, values))

        def finish(self):
            calls.append(("finish",))

    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)) or Run(),
                                 util=types.SimpleNamespace(generate_id=lambda: f"id{len(calls)}"))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    data = json.loads(json.dumps(RECIPE))
    data["train"].update(log=["wandb"], steps=4)
    recipe = seqzoo.recipe_from_dict(data)
    train(recipe, out_dir=tmp_path, progress=False, plot=False)
    inits = [c[1] for c in calls if c[0] == "init"]
    assert inits[0]["resume"] == "allow" and inits[0]["config"]["train"]["steps"] == 4
    logged = {(r["split"], r["step"]): r for r in records(tmp_path)}
    sent = [c for c in calls if c[0] == "log"]
    for _, step, values in sent:
        split = "eval" if "eval/accuracy" in values else "train"
        assert values == {f"{split}/{k}": v for k, v in scalars(logged[(split, step)]).items()}
    assert calls[-1] == ("finish",)
    # Resuming continues the same wandb run.
    data["train"]["steps"] = 6
    train(seqzoo.recipe_from_dict(data), out_dir=tmp_path, progress=False, plot=False, resume=True,
          allow_recipe_change=True)  # more steps: a changed recipe (issue 14)
    assert [c[1]["id"] for c in calls if c[0] == "init"] == [inits[0]["id"]] * 2


def test_scalars_flatten_nested_telemetry():
    record = {"step": 3, "split": "train", "loss": 1.5, "layers": {"0": {"memory_norm": 2}}, "note": "x",
              "flag": True}
    assert scalars(record) == {"loss": 1.5, "layers/0/memory_norm": 2.0}


def test_unknown_or_missing_logger_is_one_clear_error(tmp_path, monkeypatch):
    data = json.loads(json.dumps(RECIPE))
    data["train"]["log"] = ["jsonl", "tensorbord"]
    with pytest.raises(RecipeError, match="train.log.1"):
        seqzoo.recipe_from_dict(data)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(SeqzooError, match=r"pip install 'seqzoo\[tensorboard\]'"):
        train(seqzoo.recipe_from_dict(RECIPE), out_dir=tmp_path, progress=False, plot=False)
