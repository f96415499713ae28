"""Nothing lost: SIGKILL mid-run, resume, and the subsequent losses are bitwise those of an
uninterrupted run (CPU); a half-written or dangling checkpoint is never picked up."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import seqzoo
from seqzoo.errors import CheckpointError
from seqzoo.train import checkpoint as ckpt
from seqzoo.train.loop import train

RECIPE = {
    "name": "kill",
    "model": {"d_model": 32, "n_layers": 2, "mixers": {"attn": {"type": "attention", "n_heads": 2}}},
    "task": {"type": "mqar", "seq_len": 32, "num_kv_pairs": 4, "vocab_size": 32},
    "train": {"steps": 120, "batch_size": 4, "eval_every": 10_000, "eval_batches": 1, "ckpt_every": 10,
              "log_every": 1, "warmup_steps": 5, "device": "cpu"},
}
# One thread everywhere: the same reduction order in every process, so losses match bitwise.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _train_losses(out: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["split"] == "train"]


def _cli(recipe: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "seqzoo.cli", "train", str(recipe), "--out", str(out),
                             "--no-progress", *extra], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _latest_step(out: Path) -> int:
    try:
        return json.loads((out / "checkpoints" / "latest.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    recipe = tmp_path / "kill.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    ref = _cli(recipe, straight)
    victim = _cli(recipe, killed)
    try:
        deadline = time.monotonic() + 240
        while _latest_step(killed) < 20:  # two checkpoints written, the run still going
            assert victim.poll() is None, victim.stdout.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the run never reached its second checkpoint"
            time.sleep(0.005)
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(timeout=30) == -signal.SIGKILL
    finally:
        victim.kill()
    at_kill = _latest_step(killed)
    assert 20 <= at_kill < 120, "killed mid-run"
    # A write cut short at a later step, which resume must ignore.
    (killed / "checkpoints" / ".tmp-step-0000110-99").mkdir()
    (killed / "checkpoints" / ".tmp-step-0000110-99" / "model.safetensors").write_bytes(b"\x00half")
    resumed = _cli(recipe, killed, "--resume")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out.decode()[-2000:]
    assert ref.wait(timeout=300) == 0, ref.stdout.read().decode()[-2000:]

    a, b = _train_losses(straight), _train_losses(killed)
    assert [s for s, _ in b] == list(range(1, 121))  # every step exactly once
    assert a == b  # bitwise equal floats, before and after the kill


RUN = {**RECIPE, "train": {**RECIPE["train"], "steps": 6, "ckpt_every": 2}}


def test_dangling_pointer_and_partial_checkpoints_are_never_picked_up(tmp_path):
    recipe = seqzoo.recipe_from_dict(RUN)
    train(recipe, out_dir=tmp_path / "straight", progress=False, plot=False)
    out = tmp_path / "run"
    train(recipe, out_dir=out, progress=False, plot=False)
    root = out / "checkpoints"
    assert sorted(p.name for p in root.glob("step-*")) == ["step-0000004", "step-0000006"]
    shutil.rmtree(root / "step-0000006")  # latest.json now points at nothing
    (root / ".tmp-step-0000007-1").mkdir()  # a write cut short
    for name in ckpt.CHECKPOINT_FILES[:2]:
        (root / ".tmp-step-0000007-1" / name).write_bytes(b"\x00")
    (root / "step-0000005").mkdir()  # a directory without state.json
    assert ckpt.latest_checkpoint(out).name == "step-0000004"
    train(recipe, out_dir=out, progress=False, resume=True, plot=False)
    assert _train_losses(out) == _train_losses(tmp_path / "straight")
    (root / "latest.json").unlink()
    assert ckpt.latest_checkpoint(out).name == "step-0000006"  # complete, so still found
    shutil.rmtree(root)
    assert ckpt.latest_checkpoint(out) is None


def test_a_pointer_to_nothing_means_no_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / "latest.json").write_text(json.dumps({"step": 4, "path": "step-0000004"}))
    assert ckpt.latest_checkpoint(tmp_path) is None
    (root / "latest.json").write_text("{")
    with pytest.raises(CheckpointError, match="corrupt pointer"):
        ckpt.latest_checkpoint(tmp_path)
