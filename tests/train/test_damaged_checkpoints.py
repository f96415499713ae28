"""The damaged-checkpoint matrix: every kind of damage, through ``eval``, ``generate`` and
``train --resume`` of the real CLI. Each command either is unaffected by the damage (exit 0)
or refuses it in one line naming the file (exit 2) — never a traceback, never another run's
weights — and a refused resume leaves every file of the run as it was."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import seqzoo
from seqzoo.cli import main
from seqzoo.train import checkpoint as ckpt
from seqzoo.train import checkpoint_verify as verify
from seqzoo.train.loop import train

CORPUS = str(Path(seqzoo.__file__).parent)
RECIPE = {
    "name": "damage",
    "model": {"d_model": 32, "n_layers": 1, "mixers": {"a": {"type": "attention", "n_heads": 2}}},
    "task": {"type": "bytes", "seq_len": 32, "path": CORPUS, "max_bytes": 100_000},
    "train": {"steps": 4, "batch_size": 2, "eval_batches": 1, "ckpt_every": 2, "log_every": 1,
              "warmup_steps": 1, "sample_tokens": 0, "device": "cpu"},
}
STEP = "step-0000002"


class Stop(Exception):
    pass


def _stop_after_2(step, record):
    if step == 3:
        raise Stop


def _unfinished_run(out: Path, seed: int) -> None:
    recipe = seqzoo.recipe_from_dict({**RECIPE, "train": {**RECIPE["train"], "seed": seed}})
    with pytest.raises(Stop):
        train(recipe, out_dir=out, progress=False, plot=False, on_step=_stop_after_2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    _unfinished_run(root / "good", seed=0)
    _unfinished_run(root / "other", seed=1)  # same shapes, other weights
    recipe = root / "damage.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    return root


# -- ways to damage a run ---------------------------------------------------------------------
def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


def _header_len(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def _reseal(run: Path, edit: Callable[[dict], None] = lambda state: None) -> None:
    """Rewrite state.json consistently (file digests and its own checksum), after ``edit``:
    a forgery that passes the checksums, so the deeper checks must catch it."""
    c = run / "checkpoints" / STEP
    state = json.loads((c / "state.json").read_text())
    edit(state)
    state["files"] = {n: verify.digest(c / n) for n in ckpt.TENSOR_FILES if (c / n).is_file()}
    (c / "state.json").write_text(json.dumps(verify.seal(state)))


def _retensor(run: Path, name: str, edit: Callable[[dict], None]) -> None:
    path = run / "checkpoints" / STEP / name
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))
    _reseal(run)


def _raw_header(run: Path, name: str, header: dict, payload: bytes = b"", sparse_to: int | None = None) -> None:
    path = run / "checkpoints" / STEP / name
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + payload)
    if sparse_to is not None:
        with open(path, "r+b") as f:
            f.truncate(sparse_to)


def _ck(run: Path) -> Path:
    return run / "checkpoints" / STEP


def _pointer(run: Path, data) -> None:
    (run / "checkpoints" / "latest.json").write_text(data if isinstance(data, str) else json.dumps(data))


GIB16 = 16 * 2**30
MODEL, OPT, RNG, STATE = "model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"

# name -> (damage(run, other), which commands it touches: "all" or "resume")
DAMAGE: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "model: byte flipped in tensor data": (lambda r, o: _flip(_ck(r) / MODEL, -100), "all"),
    "model: byte flipped in the header": (lambda r, o: _flip(_ck(r) / MODEL, 20), "all"),
    "model: emptied": (lambda r, o: (_ck(r) / MODEL).write_bytes(b""), "all"),
    "model: cut in half": (lambda r, o: (_ck(r) / MODEL).write_bytes((_ck(r) / MODEL).read_bytes()[:3000]), "all"),
    "model: one byte appended": (lambda r, o: (_ck(r) / MODEL).write_bytes((_ck(r) / MODEL).read_bytes() + b"\0"), "all"),
    "model: another run's, same shapes": (lambda r, o: shutil.copy(_ck(o) / MODEL, _ck(r) / MODEL), "all"),
    "model: another run's, resealed": (lambda r, o: (shutil.copy(_ck(o) / MODEL, _ck(r) / MODEL), _reseal(r))[0],
                                       "none"),  # consistent: a valid checkpoint of the same recipe
    "model: garbage": (lambda r, o: (_ck(r) / MODEL).write_bytes(os.urandom(5000)), "all"),
    "model: header declares a 16 GiB tensor": (lambda r, o: _raw_header(
        r, MODEL, {"embed.weight": {"dtype": "F32", "shape": [65536, 65536], "data_offsets": [0, GIB16]}}), "all"),
    "model: sparse 16 GiB file of the wrong shape": (lambda r, o: _raw_header(
        r, MODEL, {"embed.weight": {"dtype": "F32", "shape": [65536, 65536], "data_offsets": [0, GIB16]}},
        sparse_to=8 + 80 + GIB16), "all"),
    "model: header longer than the file": (lambda r, o: (_ck(r) / MODEL).write_bytes(struct.pack("<Q", 2**40) + b"{}"),
                                           "all"),
    "model: header not JSON": (lambda r, o: (_ck(r) / MODEL).write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{["), "all"),
    "model: wrong shape, resealed": (lambda r, o: _retensor(r, MODEL, lambda t: t.update(
        {"norm.weight": torch.ones(64)})), "all"),
    "model: wrong dtype, resealed": (lambda r, o: _retensor(r, MODEL, lambda t: t.update(
        {"norm.weight": t["norm.weight"].double()})), "all"),
    "model: a tensor missing, resealed": (lambda r, o: _retensor(r, MODEL, lambda t: t.pop("norm.weight")), "all"),
    "model: an extra tensor, resealed": (lambda r, o: _retensor(r, MODEL, lambda t: t.update(
        {"extra": torch.zeros(2)})), "all"),
    "model: missing": (lambda r, o: (_ck(r) / MODEL).unlink(), "all"),
    "model: a symlink to another run's": (lambda r, o: ((_ck(r) / MODEL).unlink(),
                                                        (_ck(r) / MODEL).symlink_to(_ck(o) / MODEL)), "all"),
    "model: a directory": (lambda r, o: ((_ck(r) / MODEL).unlink(), (_ck(r) / MODEL).mkdir()), "all"),
    "optimizer: emptied": (lambda r, o: (_ck(r) / OPT).write_bytes(b""), "resume"),
    "optimizer: another run's": (lambda r, o: shutil.copy(_ck(o) / OPT, _ck(r) / OPT), "resume"),
    "optimizer: byte flipped": (lambda r, o: _flip(_ck(r) / OPT, -7), "resume"),
    "optimizer: missing": (lambda r, o: (_ck(r) / OPT).unlink(), "all"),  # incomplete: no checkpoint
    "optimizer: wrong moment shape, resealed": (lambda r, o: _retensor(r, OPT, lambda t: t.update(
        {"0.exp_avg": torch.zeros(3)})), "resume"),
    "optimizer: unknown state, resealed": (lambda r, o: _retensor(r, OPT, lambda t: t.update(
        {"0.momentum_buffer": torch.zeros(1)})), "resume"),
    "optimizer: index past the parameters, resealed": (lambda r, o: _retensor(r, OPT, lambda t: t.update(
        {"999.step": torch.zeros(())})), "resume"),
    "optimizer: param groups changed, resealed": (lambda r, o: _reseal(r, lambda s: s["optimizer"]["param_groups"][0]
                                                                        .update(params=[0])), "resume"),
    "rng: another run's": (lambda r, o: shutil.copy(_ck(o) / RNG, _ck(r) / RNG), "resume"),
    "rng: truncated": (lambda r, o: (_ck(r) / RNG).write_bytes((_ck(r) / RNG).read_bytes()[:100]), "resume"),
    "rng: wrong size, resealed": (lambda r, o: _retensor(r, RNG, lambda t: t.update(
        {"torch": t["torch"][:100].clone()})), "resume"),
    "rng: missing": (lambda r, o: (_ck(r) / RNG).unlink(), "all"),
    "state: not UTF-8": (lambda r, o: (_ck(r) / STATE).write_bytes(b'{"step": "\xff"}'), "all"),
    "state: not JSON": (lambda r, o: (_ck(r) / STATE).write_text("{step: 2"), "all"),
    "state: nested 100000 deep": (lambda r, o: (_ck(r) / STATE).write_text("[" * 100_000 + "]" * 100_000), "all"),
    "state: a list": (lambda r, o: (_ck(r) / STATE).write_text("[1, 2]"), "all"),
    "state: step -5": (lambda r, o: _reseal(r, lambda s: s.update(step=-5)), "all"),
    "state: step 10^9": (lambda r, o: _reseal(r, lambda s: s.update(step=10**9)), "all"),
    "state: step true": (lambda r, o: _reseal(r, lambda s: s.update(step=True)), "all"),
    "state: step of another directory": (lambda r, o: _reseal(r, lambda s: s.update(step=1)), "all"),
    "state: edited, not resealed": (lambda r, o: (_ck(r) / STATE).write_text(
        (_ck(r) / STATE).read_text().replace('"damage"', '"forged"')), "all"),
    "state: recipe of another run, resealed": (lambda r, o: _reseal(r, lambda s: s["recipe"].update(name="forged")),
                                               "resume"),
    "state: recipe invalid, resealed": (lambda r, o: _reseal(r, lambda s: s["recipe"]["model"].update(d_model=True)),
                                        "all"),
    "state: checksum of the model altered": (lambda r, o: (_ck(r) / STATE).write_text(
        (_ck(r) / STATE).read_text().replace(verify.sha256_file(_ck(r) / MODEL), "0" * 64)), "all"),
    "state: without checksums (seqzoo 0.1)": (lambda r, o: (_ck(r) / STATE).write_text(json.dumps(
        {k: v for k, v in json.loads((_ck(r) / STATE).read_text()).items() if k not in ("format", "files", "sha256")})),
        "all"),
    "state: an unknown key, resealed": (lambda r, o: _reseal(r, lambda s: s.update(extra_key=1)), "all"),
    "state: missing": (lambda r, o: (_ck(r) / STATE).unlink(), "all"),
    "state: a FIFO": (lambda r, o: ((_ck(r) / STATE).unlink(), os.mkfifo(_ck(r) / STATE)), "all"),
    "latest: ../../other run": (lambda r, o: _pointer(r, {"step": 2, "path": f"../../{o.name}/checkpoints/{STEP}"}), "all"),
    "latest: absolute path": (lambda r, o: _pointer(r, {"step": 2, "path": str(_ck(o))}), "all"),
    "latest: step directory is a symlink to another run's": (lambda r, o: (
        shutil.rmtree(_ck(r)), _ck(r).symlink_to(_ck(o))), "all"),
    "latest: not JSON": (lambda r, o: _pointer(r, "{"), "all"),
    "latest: path a number": (lambda r, o: _pointer(r, {"step": 2, "path": 2}), "all"),
    "latest: step disagrees with path": (lambda r, o: _pointer(r, {"step": 7, "path": STEP}), "all"),
    "latest: a symlink": (lambda r, o: ((r / "checkpoints" / "latest.json").unlink(),
                                        (r / "checkpoints" / "latest.json").symlink_to(o / "checkpoints" / "latest.json")),
                          "all"),
    "latest: non-UTF-8": (lambda r, o: (r / "checkpoints" / "latest.json").write_bytes(b"\xff\xfe"), "all"),
}


def _snapshot(run: Path) -> dict[str, str]:
    out = {}
    for p in sorted(run.rglob("*")):
        if p.name == "train.lock":
            continue
        rel = str(p.relative_to(run))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_fifo():
            out[rel] = "fifo"
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.stat().st_size < 2**24 else str(p.stat().st_size)
        else:
            out[rel] = "dir"
    return out


def _expect(code: int, err: str, *, refuse: bool, what: str) -> None:
    assert "Traceback" not in err, f"{what}: {err}"
    if refuse:
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), f"{what}: exit {code}: {err}"
    else:
        assert code == 0, f"{what}: exit {code}: {err}"


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint(damage, runs, tmp_path, capsys):
    run, other = tmp_path / "run", runs / "other"  # the other run is only read (and checked unchanged)
    shutil.copytree(runs / "good", run)
    hurt, touches = DAMAGE[damage]
    hurt(run, other)
    before = _snapshot(run)
    other_before = _snapshot(other)
    for command in (["eval", str(run), "--batches", "1", "--batch-size", "2"],
                    ["generate", str(run), "--max-new-tokens", "3"],
                    ["train", str(runs / "damage.yaml"), "--out", str(run), "--resume", "--no-progress"]):
        refuse = touches == "all" or (touches == "resume" and command[0] == "train")
        code = main(command)
        _expect(code, capsys.readouterr().err, refuse=refuse, what=f"{damage} / {command[0]}")
        if refuse and command[0] == "train":
            assert _snapshot(run) == before, f"{damage}: the refused resume changed the run"
    assert _snapshot(other) == other_before  # another run's files are never written


def test_an_intact_run_resumes_and_matches_an_uninterrupted_one(runs, tmp_path, capsys):
    """The matrix's control: the same commands succeed on the undamaged copy, and the resumed
    losses equal those of a run that was never stopped."""
    run = tmp_path / "run"
    shutil.copytree(runs / "good", run)
    assert main(["eval", str(run), "--batches", "1", "--batch-size", "2"]) == 0
    assert main(["train", str(runs / "damage.yaml"), "--out", str(run), "--resume", "--no-progress"]) == 0
    straight = tmp_path / "straight"
    assert main(["train", str(runs / "damage.yaml"), "--out", str(straight), "--no-progress"]) == 0
    capsys.readouterr()

    def losses(out):
        return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                if r["split"] == "train"]

    assert losses(run) == losses(straight)
