"""`seqzoo train` under torchrun: two CPU processes (gloo) give the losses of one process
training on the same global batch; rank 0 alone logs and checkpoints; FSDP resumes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import seqzoo
from seqzoo.train import checkpoint as ckpt
from seqzoo.train.loop import train

RECIPE = {
    "name": "ddp",
    "model": {"d_model": 32, "n_layers": 2, "mixers": {"attn": {"type": "attention", "n_heads": 2}}},
    "task": {"type": "mqar", "seq_len": 32, "num_kv_pairs": 4, "vocab_size": 32},
    "train": {"steps": 6, "batch_size": 8, "grad_accum": 2, "eval_every": 3, "eval_batches": 1,
              "ckpt_every": 3, "log_every": 1, "warmup_steps": 2, "lr": 1e-2, "device": "cpu"},
}


def _train_losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def _torchrun(recipe: Path, out: Path, parallel: str, *extra: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SEQZOO_PARALLEL": parallel}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "seqzoo.cli", "train", str(recipe), "--out", str(out), "--no-progress", *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    train(seqzoo.recipe_from_dict(RECIPE), out_dir=out, progress=False, plot=False)
    return out


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_gloo_ranks_match_one_process(tmp_path, single, parallel):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    out = tmp_path / parallel
    _torchrun(recipe, out, parallel)
    ref, got = _train_losses(single), _train_losses(out)
    assert sorted(got) == list(range(1, 7))  # one metrics log, written once (rank 0)
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-4, abs=1e-5), step
    a = load_file(str(ckpt.latest_checkpoint(single) / "model.safetensors"))
    b = load_file(str(ckpt.latest_checkpoint(out) / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:  # rank 0 wrote the full (unsharded) weights
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-4)
    assert not list(out.rglob(".tmp-*"))

    if parallel == "fsdp":  # resume a sharded run from step 3: optimiser state round-trips
        shutil.rmtree(out / "checkpoints" / "step-0000006")
        _torchrun(recipe, out, parallel, "--resume")
        resumed = _train_losses(out)
        for step in ref:
            assert resumed[step] == pytest.approx(ref[step], rel=1e-4, abs=1e-5), step
