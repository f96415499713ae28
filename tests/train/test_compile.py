"""torch.compile (inductor, CPU) of the reference paths: a model of a mixer compiles and
gives the eager outputs and gradients; ``train.compile: true`` trains to the same losses as
eager and the metrics log names each layer's backend.

Inductor's first compile of a mixer costs 20 s to 20 min of CPU (mostly the C++ compiler;
its cache makes reruns fast), so CI compiles ``mamba`` (a hand-written autograd Function,
the riskiest for tracing) and, through ``train.compile``, attention; every other mixer,
the Titans family included, runs with SEQZOO_COMPILE_ALL=1."""

from __future__ import annotations

import json
import os

import pytest
import torch

import seqzoo
from seqzoo import mixers
from seqzoo.train.loop import train
from tests.helpers import assert_close

def _model(names: list[str]):
    torch.manual_seed(0)
    return seqzoo.build_model({
        "name": "compile", "task": {"type": "bytes", "seq_len": 8},
        "model": {"d_model": 16, "n_layers": len(names), "mixers": {n: {"type": n} for n in names},
                  "layers": names, "mlp": "none"}})


def _check_compiled_equals_eager(names: list[str]) -> None:
    model = _model(names)
    tokens = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    logits, _ = model(tokens)
    logits.square().mean().backward()
    eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.compile()
    compiled, _ = model(tokens)
    compiled.square().mean().backward()
    assert_close(compiled, logits, torch.float32, "compiled logits")
    for (name, p), g in zip(model.named_parameters(), eager):
        assert_close(p.grad, g, torch.float32, f"compiled gradient of {name}")


COMPILE_ALL = os.environ.get("SEQZOO_COMPILE_ALL") == "1"
IN_CI = {"mamba"}


@pytest.mark.slow
@pytest.mark.parametrize("name", mixers.available())
def test_reference_path_compiles_and_matches_eager(name):
    if name not in IN_CI and not COMPILE_ALL:
        pytest.skip("inductor compile of every mixer: minutes of CPU; SEQZOO_COMPILE_ALL=1")
    _check_compiled_equals_eager([name])


def _losses(out) -> tuple[list[float], list[dict]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["split"] == "train"], [r for r in records if r["split"] == "setup"]


@pytest.mark.slow
def test_train_compile_gives_the_eager_losses_and_logs_the_backends(tmp_path):
    base = {"name": "tiny", "task": {"type": "bytes", "seq_len": 8},
            "model": {"d_model": 16, "n_layers": 1, "mixers": {"attn": {"type": "attention", "n_heads": 2}}},
            "train": {"steps": 2, "batch_size": 2, "log_every": 1, "eval_every": 100, "eval_batches": 1,
                      "sample_tokens": 0, "warmup_steps": 0, "device": "cpu"}}
    runs = {}
    for flag in (False, True):
        recipe = seqzoo.recipe_from_dict({**base, "train": {**base["train"], "compile": flag}})
        train(recipe, out_dir=tmp_path / str(flag), progress=False, plot=False)
        runs[flag] = _losses(tmp_path / str(flag))
    (eager, setup_eager), (compiled, setup_compiled) = runs[False], runs[True]
    assert len(eager) == 2
    assert_close(torch.tensor(compiled), torch.tensor(eager), torch.float32, "losses with train.compile")
    assert setup_compiled == [{"step": 0, "split": "setup", "compile": True, "backends": ["0:attention:sdpa"]}]
    assert setup_eager[0]["compile"] is False
