"""Precision: bf16 autocast and gradient accumulation share one code path with fp32 (on GPU
"auto" means bf16; on CPU fp32, and bf16 can be forced to exercise the same path)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import seqzoo
from seqzoo.train.loop import _autocast, train

RECIPE = {
    "name": "prec",
    "model": {"d_model": 32, "n_layers": 1, "mixers": {"attn": {"type": "attention", "n_heads": 2}}},
    "task": {"type": "mqar", "seq_len": 16, "num_kv_pairs": 2, "vocab_size": 16},
    "train": {"steps": 3, "batch_size": 4, "grad_accum": 2, "eval_every": 100, "eval_batches": 1,
              "ckpt_every": 100, "log_every": 1, "warmup_steps": 1, "device": "cpu"},
}


def _losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]


def test_auto_precision_is_fp32_on_cpu_and_bf16_on_gpu():
    assert _autocast("auto", torch.device("cpu")) is None and _autocast("fp32", torch.device("cuda")) is None
    with warnings.catch_warnings():  # "CUDA is not available": only the settings are checked here
        warnings.simplefilter("ignore")
        assert _autocast("auto", torch.device("cuda")).fast_dtype == torch.bfloat16


def test_bf16_autocast_with_accumulation_tracks_fp32(tmp_path):
    fp32 = train(seqzoo.recipe_from_dict(RECIPE), out_dir=tmp_path / "fp32", progress=False, plot=False)
    data = json.loads(json.dumps(RECIPE))
    data["train"]["precision"] = "bf16"
    bf16 = train(seqzoo.recipe_from_dict(data), out_dir=tmp_path / "bf16", progress=False, plot=False)
    a, b = _losses(fp32.out_dir), _losses(bf16.out_dir)
    assert len(a) == len(b) == 3 and a != b  # autocast really ran in bf16
    assert b == pytest.approx(a, rel=3e-2)  # bf16 has ~3 significant digits
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())  # fp32 master weights
