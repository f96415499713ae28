"""One-line loading: `seqzoo.load_run` and `LanguageModel.save_pretrained` / `from_pretrained`
(JSON + safetensors only), with clear errors for what is not a seqzoo directory."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import seqzoo
from seqzoo.cli import main
from seqzoo.errors import CheckpointError, RecipeError
from seqzoo.models.lm import LanguageModel
from seqzoo.train.loop import train

RECIPE = {
    "name": "pre",
    "model": {"d_model": 16, "n_layers": 2, "mixers": {"a": {"type": "attention", "n_heads": 2},
                                                       "g": {"type": "gla", "n_heads": 2}}, "pattern": ["a", "g"]},
    "task": {"type": "mqar", "seq_len": 16, "num_kv_pairs": 2, "vocab_size": 16},
    "train": {"steps": 3, "batch_size": 2, "eval_batches": 1, "ckpt_every": 2, "device": "cpu"},
}


def test_load_run_gives_the_trained_model_recipe_step_and_task(tmp_path):
    recipe = seqzoo.recipe_from_dict(RECIPE)
    result = train(recipe, out_dir=tmp_path, progress=False, plot=False)
    run = seqzoo.load_run(tmp_path)
    assert run.step == 3 and run.recipe == recipe and run.task.name == "mqar" and not run.model.training
    x = run.task.train_batch(0, 2)[0]
    assert torch.equal(run.model(x)[0], result.model.eval()(x)[0])
    older = seqzoo.load_run(tmp_path / "checkpoints" / "step-0000002")  # a checkpoint directory itself
    assert older.step == 2 and not torch.equal(older.model(x)[0], run.model(x)[0])
    assert main(["export", str(tmp_path), str(tmp_path / "exported")]) == 0  # the CLI's way to the same
    assert torch.equal(LanguageModel.from_pretrained(tmp_path / "exported")(x)[0], run.model(x)[0])
    with pytest.raises(CheckpointError, match="no such run"):
        seqzoo.load_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        seqzoo.load_run(tmp_path / "empty")


@pytest.mark.parametrize("tied", [True, False])
def test_save_pretrained_round_trip(tmp_path, tied):
    data = json.loads(json.dumps(RECIPE))
    data["model"]["tie_embeddings"] = tied
    torch.manual_seed(0)
    model = seqzoo.build_model(data).eval()
    out = model.save_pretrained(tmp_path / "p")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]  # MQAR: no tokenizer
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "seqzoo" and config["vocab_size"] == model.vocab_size
    weights = load_file(str(out / "model.safetensors"))
    assert all(k.startswith("model.") for k in weights)
    assert ("model.head.weight" in weights) == (not tied)  # a tied head is stored once
    loaded = LanguageModel.from_pretrained(out)
    x = torch.randint(0, 16, (2, 11))
    assert torch.equal(loaded(x)[0], model(x)[0])
    assert (loaded.head.weight is loaded.embed.weight) == tied


def test_text_models_carry_a_tokenizer(tmp_path):
    pytest.importorskip("tokenizers")
    model = seqzoo.build_model({**RECIPE, "task": {"type": "bytes", "seq_len": 16}})
    out = model.save_pretrained(tmp_path / "p")
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(out / "tokenizer.json")).encode("héllo").ids == list("héllo".encode())


def test_not_a_pretrained_directory_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        LanguageModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type: expected 'seqzoo', got 'llama'"):
        LanguageModel.from_pretrained(tmp_path)
    model = seqzoo.build_model(RECIPE)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["recipe"]["model"]["d_model"] = 32
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="shape"):
        LanguageModel.from_pretrained(tmp_path)
    config["recipe"]["model"]["mixers"]["a"]["n_haeds"] = 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(RecipeError, match="model.mixers.a.n_haeds"):
        LanguageModel.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 10)
    config["recipe"]["model"]["mixers"]["a"].pop("n_haeds")
    config["recipe"]["model"]["d_model"] = 16
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="corrupt safetensors"):
        LanguageModel.from_pretrained(tmp_path)
