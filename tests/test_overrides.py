"""Command-line overrides: dotted keys, YAML values, the same validation as the file, the
effective recipe recorded in the run directory and shown by `describe`, sweeps too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import seqzoo
from seqzoo.cli import main
from seqzoo.compare.schema import load_sweep
from seqzoo.errors import RecipeError, SeqzooError
from seqzoo.overrides import apply_overrides, parse_overrides

RECIPE = {
    "name": "ov",
    "model": {"d_model": 32, "n_layers": 2, "mixers": {"attn": {"type": "attention", "n_heads": 2}},
              "pattern": ["attn"]},
    "task": {"type": "mqar", "seq_len": 16, "num_kv_pairs": 2, "vocab_size": 16},
    "train": {"steps": 2, "batch_size": 2, "eval_batches": 1, "device": "cpu"},
}


@pytest.fixture
def recipe_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(RECIPE))
    return path


def test_values_are_yaml_scalars_and_numbers():
    assert parse_overrides(["train.lr=1e-3", "a.b=32", "c=true", "d=null", "e=[x, y]", "f={type: mamba}", "g=",
                            "h=abc", "i=1.5"]) == [
        ("train.lr", 0.001), ("a.b", 32), ("c", True), ("d", None), ("e", ["x", "y"]), ("f", {"type": "mamba"}),
        ("g", None), ("h", "abc"), ("i", 1.5)]
    for bad in ["train.lr", "=3", "a..b=1", "x=[unclosed"]:
        with pytest.raises(SeqzooError):
            parse_overrides([bad])


def test_dotted_keys_create_mappings_and_index_lists():
    data = {"model": {"pattern": ["a", "b"]}}
    out = apply_overrides(data, [("model.pattern.1", "c"), ("model.mixers.m.window", 8), ("task.seq_len", 64)],
                          path="r.yaml")
    assert out == {"model": {"pattern": ["a", "c"], "mixers": {"m": {"window": 8}}}, "task": {"seq_len": 64}}
    assert data == {"model": {"pattern": ["a", "b"]}}  # the input is left alone
    with pytest.raises(RecipeError, match="model.pattern.5: override model.pattern.5: expected a list index below 2"):
        apply_overrides(data, [("model.pattern.5", "c")], path="r.yaml")


def test_overrides_validate_like_the_file(recipe_file):
    recipe = seqzoo.load_recipe(recipe_file, overrides=["train.lr=1e-3", "model.d_model=64",
                                                        "model.mixers.attn.window=8", "task.seq_len=24"])
    assert (recipe.train.lr, recipe.model.d_model, recipe.task["seq_len"]) == (0.001, 64, 24)
    assert recipe.mixer_configs()["attn"][1].window == 8
    cases = {"trian.lr=1": "trian: unknown key", "train.lr=-1": "train.lr: Input should be greater than 0",
             "model.mixers.attn.n_heads=5": "model.mixers.attn.n_heads: expected a positive divisor",
             "model.mixers.attn.windw=3": "model.mixers.attn.windw: unknown key for mixer 'attention'",
             "task.seq_len=abc": "task.seq_len: Input should be a valid integer"}
    for item, expected in cases.items():
        with pytest.raises(RecipeError) as info:
            seqzoo.load_recipe(recipe_file, overrides=[item])
        msg = str(info.value)
        assert msg.startswith(str(recipe_file)) and expected in msg and f"(set on the command line: {item}" in msg


def test_cli_train_records_the_effective_recipe_and_describe_shows_it(recipe_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(recipe_file), "--out", str(out), "--no-progress", "train.lr=2e-3",
                 "model.mixers.attn.window=4"]) == 0
    recorded = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recorded["train"]["lr"] == 0.002 and recorded["model"]["mixers"]["attn"]["window"] == 4
    assert seqzoo.recipe_from_dict(recorded) == seqzoo.load_run(out).recipe  # the same recipe as the checkpoint's
    capsys.readouterr()
    # Overrides may also follow the options.
    assert main(["describe", str(recipe_file), "model.n_layers=3", "train.lr=5e-4"]) == 0
    shown = capsys.readouterr().out
    assert "model.n_layers=3" in shown and "lr: 0.0005" in shown and "| 2 | attn | attention |" in shown
    assert main(["train", str(recipe_file), "--out", str(tmp_path / "x"), "train.lr=-1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.lr" in err and "Traceback" not in err


def test_sweep_overrides(tmp_path):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"name": "s", "task": {"type": "mqar", "seq_len": 16}, "models": ["x.yaml"],
                                     "train": {"steps": 10}}))
    s = load_sweep(sweep, overrides=["train.steps=3", "model.d_model=16", "task.seq_len=32"])
    assert (s.train.steps, s.model, s.task["seq_len"]) == (3, {"d_model": 16}, 32)
    with pytest.raises(RecipeError, match=r"train.stpes: unknown key.*set on the command line: train.stpes=3"):
        load_sweep(sweep, overrides=["train.stpes=3"])


def test_python_dash_m_seqzoo_and_version():
    proc = subprocess.run([sys.executable, "-m", "seqzoo", "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"seqzoo {seqzoo.__version__}"
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["version"] == seqzoo.__version__  # one version, not two that drift
