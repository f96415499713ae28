"""One writer per run directory: a second `train` (plain, --resume or --overwrite) on a run
in use is refused naming the writer's pid and changes nothing; readers need no lock; a
killed writer's lock is gone with it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import seqzoo
from seqzoo.cli import main
from seqzoo.train.loop import train
from seqzoo.train.run_lock import LOCK_FILE, RunInUse, RunLock
from tests.train.run_files import file_digests

RECIPE = {
    "name": "lock",
    "model": {"d_model": 32, "n_layers": 1, "mixers": {"a": {"type": "attention", "n_heads": 2}}},
    "task": {"type": "mqar", "seq_len": 32, "num_kv_pairs": 4, "vocab_size": 32},
    "train": {"steps": 2, "batch_size": 2, "eval_batches": 1, "warmup_steps": 1, "log_every": 1, "ckpt_every": 1},
}
HOLD = ("import sys, time; from seqzoo.train.run_lock import RunLock; RunLock(sys.argv[1]).acquire(); "
        "print('held', flush=True); time.sleep(600)")




@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock of tmp_path/run, as a live `seqzoo train` would."""
    out = tmp_path / "run"
    train(seqzoo.recipe_from_dict(RECIPE), out_dir=out, progress=False, plot=False)
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(seqzoo.__file__).parents[1])})
    assert proc.stdout.readline().strip() == "held"
    yield out, proc
    proc.kill()
    proc.wait()


def test_a_second_writer_is_refused_with_the_first_ones_pid(holder, tmp_path, capsys):
    out, proc = holder
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "train": {**RECIPE["train"], "steps": 4}}))
    before = file_digests(out)
    for extra in ([], ["--overwrite"], ["--resume", "--allow-recipe-change"]):
        assert main(["train", str(recipe), "--out", str(out), "--no-progress", *extra]) == 2
        err = capsys.readouterr().err
        assert f"in use by pid {proc.pid}" in err and len(err.strip().splitlines()) == 1, err
        assert file_digests(out) == before  # --overwrite deleted nothing of the live run
    # Readers take no lock.
    assert main(["eval", str(out), "--batches", "1", "--batch-size", "2"]) == 0


def test_the_lock_goes_with_a_killed_writer(holder, capsys):
    out, proc = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with RunLock(out):  # free again: the kernel released it
        with pytest.raises(RunInUse, match=f"in use by pid {os.getpid()}"):
            RunLock(out).acquire()  # and held now, even against this same process


def test_concurrent_trains_on_one_directory_one_wins(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "train": {**RECIPE["train"], "steps": 3000, "ckpt_every": 1000,
                                                          "eval_every": 1000}}))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(seqzoo.__file__).parents[1])}
    cmd = [sys.executable, "-m", "seqzoo.cli", "train", str(recipe), "--out", str(out), "--no-progress"]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / LOCK_FILE).exists() or not (out / LOCK_FILE).read_text().strip():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.01)
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    # 3000 steps take longer than the second process needs to start (about 4 s: torch's import).
    assert second.returncode == 2 and f"in use by pid {first.pid}" in second.stderr, second.stderr
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if r["split"] == "train"]
    assert steps == list(range(1, 3001))  # every record once


def test_a_file_as_out_and_an_unwritable_parent_are_one_line(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    (tmp_path / "file").write_text("keep me")
    assert main(["train", str(recipe), "--out", str(tmp_path / "file"), "--no-progress"]) == 2
    assert "--out: " in capsys.readouterr().err and (tmp_path / "file").read_text() == "keep me"
    assert main(["train", str(recipe), "--out", str(tmp_path / "file" / "sub"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "file/sub: cannot write the run directory (Not a directory)" in err and len(err.splitlines()) == 1
