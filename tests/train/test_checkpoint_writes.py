"""Nothing lost when writing: pruning touches only complete checkpoints older than the new
one, temporaries of interrupted writes are cleaned, a tied model with non-finite weights
still saves, and a full disk or a read-only directory is one line that leaves what was there."""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import SafetensorError

import seqzoo
from seqzoo.cli import main
from seqzoo.env_errors import environment_error_line
from seqzoo.errors import CheckpointError, SeqzooError
from seqzoo.train import checkpoint as ckpt
from seqzoo.train.loop import train
from tests.train.run_files import train_losses

RECIPE = {
    "name": "writes",
    "model": {"d_model": 32, "n_layers": 1, "mixers": {"a": {"type": "attention", "n_heads": 2}}},
    "task": {"type": "mqar", "seq_len": 32, "num_kv_pairs": 4, "vocab_size": 32},
    "train": {"steps": 6, "batch_size": 2, "eval_batches": 1, "ckpt_every": 2, "log_every": 1, "warmup_steps": 1,
              "device": "cpu"},
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(seqzoo.__file__).parents[1])}


def _recipe(**train_overrides) -> seqzoo.Recipe:
    return seqzoo.recipe_from_dict({**RECIPE, "train": {**RECIPE["train"], **train_overrides}})


def _steps(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("step-*"))




def test_stale_higher_steps_are_never_pruned_nor_prune_the_new_checkpoint(tmp_path):
    out = tmp_path / "run"
    for stale in ("step-0000998", "step-0000999"):  # leftovers of some other run, incomplete
        (out / "checkpoints" / stale).mkdir(parents=True)
        (out / "checkpoints" / stale / "model.safetensors").write_bytes(b"old")
    train(_recipe(), out_dir=out, progress=False, plot=False)
    assert _steps(out) == ["step-0000004", "step-0000006", "step-0000998", "step-0000999"]
    assert ckpt.latest_checkpoint(out).name == "step-0000006"
    assert main(["eval", str(out), "--batches", "1", "--batch-size", "2"]) == 0


def test_a_stray_complete_checkpoint_does_not_make_resume_delete_the_good_one(tmp_path):
    straight = tmp_path / "straight"
    train(_recipe(), out_dir=straight, progress=False, plot=False)
    out = tmp_path / "run"

    class Crash(Exception):
        pass

    def crash(step, record):
        if step == 5:
            raise Crash

    with pytest.raises(Crash):
        train(_recipe(), out_dir=out, progress=False, plot=False, on_step=crash)
    shutil.copytree(out / "checkpoints" / "step-0000004", out / "checkpoints" / "step-0000999")
    train(_recipe(), out_dir=out, resume=True, progress=False, plot=False)
    assert _steps(out) == ["step-0000004", "step-0000006", "step-0000999"]
    assert ckpt.latest_checkpoint(out).name == "step-0000006"
    assert train_losses(out) == train_losses(straight)


def test_temporaries_of_interrupted_writes_are_cleaned(tmp_path):
    out = tmp_path / "run"
    root = out / "checkpoints"
    (root / ".tmp-step-0000002-12345").mkdir(parents=True)
    (root / ".tmp-replaced-step-0000002-12345").mkdir()
    (root / ".latest.json.tmp-12345").write_text("{")
    (out / "metrics.tmp").write_text("x")
    train(_recipe(steps=2), out_dir=out, progress=False, plot=False)
    assert not list(root.glob(".*")) and not (out / "metrics.tmp").exists()


def test_a_failed_write_removes_its_temporary_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    train(_recipe(steps=2), out_dir=out, progress=False, plot=False)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    real = ckpt.save_file

    def disk_full(tensors, path, *args, **kwargs):
        if path.endswith("optimizer.safetensors"):
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                  'message: "No space left on device" })')
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", disk_full)
    assert main(["train", str(recipe), "--out", str(out), "--resume", "--allow-recipe-change", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "could not write checkpoint step 4: No space left on device" in err and len(err.splitlines()) == 2  # + warning
    assert _steps(out) == ["step-0000002"] and not list((out / "checkpoints").glob(".tmp-*"))
    monkeypatch.setattr(ckpt, "save_file", real)
    assert main(["eval", str(out), "--batches", "1", "--batch-size", "2"]) == 0


def test_a_real_size_limit_is_one_line(tmp_path):
    """The OS refusing a write (RLIMIT_FSIZE: EFBIG, as ENOSPC would) mid-run: exit 2, one
    line naming the checkpoint directory, the temporary removed."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))

    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "seqzoo.cli", "train", str(recipe), "--out", str(out),
                           "--no-progress"], env=ENV, preexec_fn=limit, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"{out / 'checkpoints'}: could not write checkpoint step 2" in proc.stderr and "File too large" in proc.stderr
    assert not list((out / "checkpoints").glob(".tmp-*")) and not _steps(out)


@pytest.fixture
def tmpfs(tmp_path):
    """A 300 KB tmpfs (room for one checkpoint of the test model) (where mounting is allowed, e.g. as root in a container), for a real
    full disk and a real read-only remount."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_really_full_disk_and_a_read_only_one(tmpfs, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "train": {**RECIPE["train"], "ckpt_every": 1}}))
    out = tmpfs / "run"
    assert main(["train", str(recipe), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and len(err.strip().splitlines()) == 1, err
    kept = ckpt.latest_checkpoint(out)
    assert kept is not None and not list((out / "checkpoints").glob(".tmp-*"))
    assert main(["eval", str(out), "--batches", "1", "--batch-size", "2"]) == 0  # the last one is intact
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    capsys.readouterr()
    assert main(["train", str(recipe), "--out", str(out), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Read-only file system" in err and str(out) in err and len(err.strip().splitlines()) == 1, err
    assert main(["eval", str(out), "--batches", "1", "--batch-size", "2"]) == 0  # readers need no write access


def test_a_read_only_run_directory_is_one_line(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    train(_recipe(steps=2), out_dir=out, progress=False, plot=False)
    before = sorted(p.name for p in out.rglob("*"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).startswith(str(out)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    assert main(["train", str(recipe), "--out", str(out), "--overwrite", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'train.lock'}: cannot write the run directory (Read-only file system)" in err
    assert sorted(p.name for p in out.rglob("*")) == before


def test_a_tied_model_with_non_finite_weights_still_saves(tmp_path):
    recipe = _recipe()
    model = seqzoo.build_model(recipe)
    assert model.head.weight is model.embed.weight
    with torch.no_grad():
        model.embed.weight[0, 0] = float("nan")
    saved = ckpt.save_checkpoint(tmp_path, step=1, model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                 recipe=recipe.model_dump(mode="json"))
    again = seqzoo.build_model(recipe)
    ckpt.load_model_weights(saved, again)
    assert again.head.weight is again.embed.weight and torch.isnan(again.embed.weight[0, 0])


def test_memory_that_cannot_fit_is_refused_before_allocating(tmp_path, capsys):
    huge = _recipe()
    data = huge.model_dump()
    data["model"].update(d_model=16384, n_layers=512)
    with pytest.raises(SeqzooError, match=r"needs at least [0-9,.]+ GiB .* more than the"):
        train(seqzoo.recipe_from_dict(data), out_dir=tmp_path / "huge", progress=False)
    path = tmp_path / "huge.yaml"
    path.write_text(yaml.safe_dump(json.loads(json.dumps(data))))
    assert main(["describe", str(path)]) == 0  # shapes only
    assert "parameters" in capsys.readouterr().out


def test_environment_errors_are_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys):
    assert environment_error_line(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to "
                                               "allocate 1 bytes")).startswith("out of memory")
    assert environment_error_line(OSError(errno.ENOSPC, "No space left on device", "/x")) == "/x: No space left on device"
    assert environment_error_line(RuntimeError("shape mismatch")) is None
    import seqzoo.cli as cli

    def oom(args):
        raise MemoryError

    monkeypatch.setitem(cli.COMMANDS, "describe", oom)
    assert main(["describe", "x"]) == 2 and capsys.readouterr().err.startswith("error: out of memory")

    def bug(args):
        raise RuntimeError("shape mismatch")

    monkeypatch.setitem(cli.COMMANDS, "describe", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(["describe", "x"])


def test_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        ckpt.read_state(tmp_path)
