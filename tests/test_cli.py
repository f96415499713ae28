"""The CLI: help for every command, exit code 2 with one clear line on bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from seqzoo.cli import main


@pytest.mark.parametrize("command", ["train", "eval", "generate", "describe", "list"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert len(capsys.readouterr().out) > 100


def test_bad_recipe_exits_2_with_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"d_model": 32, "mixers": {"a": {"type": "attention", "n_heads": 5}}}}))
    assert main(["train", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.yaml" in err and "model.mixers.a.n_heads" in err
    assert "Traceback" not in err


def test_missing_run_exits_2(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "none")]) == 2
    assert "no such run" in capsys.readouterr().err


def test_train_eval_generate_end_to_end(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "cli", "model": {"d_model": 32, "n_layers": 1, "mixers": {"a": {"type": "attention", "n_heads": 2}}},
        "task": {"type": "bytes", "seq_len": 32, "max_bytes": 200000},
        "train": {"steps": 3, "batch_size": 2, "eval_batches": 1, "sample_tokens": 8}}))
    out = tmp_path / "run"
    assert main(["train", str(recipe), "--out", str(out), "--no-progress"]) == 0
    assert "sample:" in capsys.readouterr().out
    assert main(["eval", str(out), "--batches", "1", "--batch-size", "2"]) == 0
    assert "bpb=" in capsys.readouterr().out
    assert main(["generate", str(out), "--prompt", "import ", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("import ")
    assert main(["describe", str(recipe)]) == 0
    assert "| 0 | a | attention |" in capsys.readouterr().out


def test_console_script_list():
    proc = subprocess.run([sys.executable, "-m", "seqzoo.cli", "list"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "attention" in proc.stdout and "mqar" in proc.stdout
