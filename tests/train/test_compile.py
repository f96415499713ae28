"""torch.compile (inductor, CPU) of the reference paths: a model of each non-Titans mixer
compiles and gives the eager outputs and gradients (20-60 s of CPU each, mostly the C++
compiler; inductor's cache makes reruns fast); ``train.compile: true`` trains to
the same losses as eager and the metrics log names each layer's backend.

The Titans family (titans, titans_mac / mag / mal, ttt_*) also compiles, with many graph
breaks in the memory ops, but takes minutes of CPU to trace; it runs with
SEQZOO_COMPILE_ALL=1 rather than in CI."""

from __future__ import annotations

import json
import os

import pytest
import torch

import seqzoo
from seqzoo import mixers
from seqzoo.train.loop import train
from tests.helpers import assert_close

TITANS_FAMILY = {"titans", "titans_mac", "titans_mag", "titans_mal", "ttt_linear", "ttt_mlp"}


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


REFERENCE_PATHS = [n for n in mixers.available() if n not in TITANS_FAMILY]


def test_the_cheap_list_covers_the_core_mixers():
    assert {"attention", "retnet", "gla", "deltanet", "gated_deltanet", "mamba", "mamba2"} <= set(REFERENCE_PATHS)


@pytest.mark.slow
@pytest.mark.parametrize("name", REFERENCE_PATHS)
def test_reference_path_compiles_and_matches_eager(name):
    _check_compiled_equals_eager([name])


@pytest.mark.skipif(os.environ.get("SEQZOO_COMPILE_ALL") != "1", reason="minutes of CPU; SEQZOO_COMPILE_ALL=1")
@pytest.mark.parametrize("name", sorted(TITANS_FAMILY))
def test_titans_family_compiles_and_matches_eager(name):
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
