"""Resume is exact or refused: only the same recipe continues (the first differing key is
named), --allow-recipe-change says otherwise, and a resume with nothing to continue is an
error that changes nothing."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

import seqzoo
from seqzoo.cli import main
from seqzoo.train import checkpoint as ckpt
from seqzoo.train.resume_check import canonical, first_difference
from tests.train.run_files import file_digests, train_losses

RECIPE = {
    "name": "resume",
    "model": {"d_model": 32, "n_layers": 2, "mixers": {"attn": {"type": "attention", "n_heads": 2},
                                                      "swa": {"type": "attention", "n_heads": 2, "window": 8}},
              "pattern": ["attn", "swa"]},
    "task": {"type": "mqar", "seq_len": 32, "num_kv_pairs": 4, "vocab_size": 32},
    "train": {"steps": 6, "batch_size": 4, "eval_batches": 1, "ckpt_every": 2, "log_every": 1, "warmup_steps": 1,
              "device": "cpu"},
}


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _changed(path: str, value) -> dict:
    data = copy.deepcopy(RECIPE)
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[key]
    node[last] = value
    return data






@pytest.fixture(scope="module")
def unfinished(tmp_path_factory):
    """A run stopped after its step-4 checkpoint (`--steps 4` of a 6-step recipe, then the
    stored recipe rewritten to be the 6-step one, as a crash at step 5 would leave it)."""
    root = tmp_path_factory.mktemp("resume")
    recipe = _write(root / "r.yaml", RECIPE)
    straight = root / "straight"
    assert main(["train", str(recipe), "--out", str(straight), "--no-progress"]) == 0
    out = root / "run"
    from seqzoo.train.loop import train

    class Stop(Exception):
        pass

    def stop(step, record):
        if step == 5:
            raise Stop

    with pytest.raises(Stop):
        train(seqzoo.load_recipe(recipe), out_dir=out, progress=False, plot=False, on_step=stop)
    return root, recipe, straight, out


def _copy(unfinished, tmp_path) -> Path:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(unfinished[3], run)
    return run


@pytest.mark.parametrize("path, value, key", [
    ("name", "other", "name"),
    ("model.mixers.swa.window", 16, "model.mixers.swa.window"),
    ("train.lr", 1.0e-3, "train.lr"),
    ("train.batch_size", 2, "train.batch_size"),
    ("train.steps", 8, "train.steps"),
    ("task.num_kv_pairs", 3, "task.num_kv_pairs"),
    ("model.pattern", ["attn", "attn"], "model.layers[1]"),
])
def test_a_different_recipe_is_refused_naming_the_first_difference(path, value, key, unfinished, tmp_path, capsys):
    run = _copy(unfinished, tmp_path)
    before = file_digests(run)
    other = _write(tmp_path / "other.yaml", _changed(path, value))
    assert main(["train", str(other), "--out", str(run), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"state.json: {key}: the checkpoint was trained with" in err and "--allow-recipe-change" in err, err
    assert len(err.strip().splitlines()) == 1
    assert file_digests(run) == before


def test_the_same_recipe_resumes_exactly_even_written_differently(unfinished, tmp_path, capsys):
    """Defaults written out, the pattern as an explicit layer list, another description and
    device: the same run, resumed bitwise."""
    root, _, straight, _ = unfinished
    run = _copy(unfinished, tmp_path)
    same = copy.deepcopy(RECIPE)
    same["description"] = "written differently"
    same["model"].pop("pattern")
    same["model"]["layers"] = ["attn", "swa"]
    same["model"]["mixers"]["attn"]["rope_base"] = 10000.0  # the default
    same["task"]["seed"] = 0
    same["train"]["device"] = "auto"
    assert main(["train", str(_write(tmp_path / "same.yaml", same)), "--out", str(run), "--resume",
                 "--no-progress"]) == 0
    assert train_losses(run) == train_losses(straight)


def test_allow_recipe_change_continues_with_the_new_recipe(unfinished, tmp_path, capsys):
    run = _copy(unfinished, tmp_path)
    other = _write(tmp_path / "other.yaml", _changed("train.lr", 1.0e-3))
    assert main(["train", str(other), "--out", str(run), "--resume", "--allow-recipe-change", "--no-progress"]) == 0
    assert "warning: resuming" in capsys.readouterr().err
    assert [s for s, _ in train_losses(run)] == list(range(1, 7))
    assert ckpt.read_state(ckpt.latest_checkpoint(run))["recipe"]["train"]["lr"] == 1.0e-3


def test_resume_with_nothing_to_resume_changes_nothing(unfinished, tmp_path, capsys):
    recipe = unfinished[1]
    missing = tmp_path / "never"
    assert main(["train", str(recipe), "--out", str(missing), "--resume", "--no-progress"]) == 2
    assert "nothing to resume" in capsys.readouterr().err and not missing.exists()
    # A run killed before its first checkpoint: metrics and a cut-short write, nothing complete.
    partial = tmp_path / "partial"
    (partial / "checkpoints" / ".tmp-step-0000002-1").mkdir(parents=True)
    (partial / "checkpoints" / "step-0000002").mkdir()
    (partial / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 3.0}\n')
    before = file_digests(partial)
    assert main(["train", str(recipe), "--out", str(partial), "--resume", "--no-progress"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert file_digests(partial) == before and (partial / "checkpoints" / ".tmp-step-0000002-1").is_dir()


def test_a_finished_run_has_nothing_to_resume(unfinished, capsys):
    _, recipe, straight, _ = unfinished
    before = file_digests(straight)
    assert main(["train", str(recipe), "--out", str(straight), "--resume", "--no-progress"]) == 2
    assert "nothing to resume" in capsys.readouterr().err and file_digests(straight) == before


def test_resume_and_overwrite_together_are_refused(unfinished, tmp_path, capsys):
    run = _copy(unfinished, tmp_path)
    before = file_digests(run)
    assert main(["train", str(unfinished[1]), "--out", str(run), "--resume", "--overwrite", "--no-progress"]) == 2
    assert "give one" in capsys.readouterr().err and file_digests(run) == before


def test_canonical_form_and_first_difference():
    a = seqzoo.recipe_from_dict(RECIPE)
    assert first_difference(canonical(a), canonical(a)) is None
    b = seqzoo.recipe_from_dict(_changed("model.mixers.attn.n_heads", 4))
    assert first_difference(canonical(a), canonical(b)) == ("model.mixers.attn.n_heads", 2, 4)
    assert first_difference({"x": 1}, {"x": 1.0}) is None  # the same number
    assert first_difference({"x": 1}, {"x": True}) == ("x", 1, True)  # not the same setting
    assert first_difference({"x": [1, 2]}, {"x": [1]}) == ("x", [1, 2], [1])
