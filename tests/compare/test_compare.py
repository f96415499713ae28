"""`seqzoo compare`: strict sweep files, identical data and schedule for every model, the
best learning rate kept, report.md and PNG plots written; `--smoke` through the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from seqzoo.cli import main
from seqzoo.compare import load_sweep, run_sweep
from seqzoo.compare.runner import _pick_best, RunResult, build_recipes, data_fingerprint, higher_is_better
from seqzoo.errors import RecipeError, SeqzooError
from seqzoo.tasks import build_task
from seqzoo.train.loop import TrainingDiverged

ROOT = Path(__file__).resolve().parents[2]
SWEEPS = sorted((ROOT / "recipes" / "compare").glob("*.yaml"))
PNG = b"\x89PNG\r\n\x1a\n"


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def models(tmp_path) -> tuple[Path, Path]:
    a = _write(tmp_path / "a.yaml", {"name": "attn", "model": {"d_model": 16, "n_layers": 1, "mixers": {
        "m": {"type": "attention", "n_heads": 2}}}, "task": {"type": "bytes"}, "train": {"steps": 999, "lr": 9.0}})
    b = _write(tmp_path / "b.yaml", {"name": "ret", "model": {"d_model": 16, "n_layers": 1, "vocab_size": 256,
                                                             "mixers": {"m": {"type": "retnet", "n_heads": 2}}}})
    return a, b


def _sweep(tmp_path, models, **extra) -> Path:
    data = {"name": "t", "task": {"type": "mqar", "seq_len": 16, "num_kv_pairs": 2, "vocab_size": 16},
            "train": {"steps": 4, "batch_size": 4, "eval_batches": 1, "eval_every": 2, "log_every": 1,
                      "warmup_steps": 1},
            "eval_seq_lens": [16, 32], "eval_batches": 1, "models": [str(m) for m in models], **extra}
    return _write(tmp_path / "sweep.yaml", data)


def test_every_model_gets_the_sweeps_task_train_and_vocabulary(tmp_path, models):
    sweep_path = _sweep(tmp_path, models, model={"d_model": 32})
    built = build_recipes(load_sweep(sweep_path), sweep_path)
    assert [label for label, _, _ in built] == ["attn", "ret"]
    (_, _, a), (_, _, b) = built
    assert a.task == b.task == {"type": "mqar", "seq_len": 16, "num_kv_pairs": 2, "vocab_size": 16}
    assert a.train == b.train and a.train.steps == 4 and a.train.lr == 3e-3  # not the recipe's 9.0
    assert a.model.d_model == b.model.d_model == 32
    assert a.vocab_size() == b.vocab_size() == 16  # the recipe's vocab_size=256 gives way to the task's
    task = build_task(a.task)
    assert data_fingerprint(task, 4, 4) == data_fingerprint(build_task(b.task), 4, 4)
    assert data_fingerprint(task, 4, 4) != data_fingerprint(build_task({**a.task, "seed": 1}), 4, 4)


def test_sweep_files_are_strict(tmp_path, models):
    bad = _write(tmp_path / "bad.yaml", {"name": "x", "task": {"type": "mqar"}, "models": [str(models[0])], "stepz": 3})
    with pytest.raises(RecipeError, match="bad.yaml: stepz: unknown key"):
        load_sweep(bad)
    bad = _write(tmp_path / "bad2.yaml", {"name": "x", "task": {"type": "mqar"}, "models": [{"recipe": str(models[0]), "lr": 1}]})
    with pytest.raises(RecipeError, match=r"models\[0\]\.lr"):
        load_sweep(bad)
    bad = _write(tmp_path / "bad3.yaml", {"name": "x", "task": {"type": "mqar", "seq_len": 4}, "models": [str(models[0])]})
    with pytest.raises(RecipeError, match=r"models\[0\].*task.*seq_len"):
        build_recipes(load_sweep(bad), bad)
    bad = _write(tmp_path / "bad4.yaml", {"name": "x", "task": {"type": "mqar"}, "models": ["nope.yaml"]})
    with pytest.raises(RecipeError, match=r"models\[0\]\.recipe: no such recipe file"):
        build_recipes(load_sweep(bad), bad)
    bad = _write(tmp_path / "bad5.yaml", {"name": "x", "task": {"type": "mqar"}, "models": [str(models[0])] * 2})
    with pytest.raises(RecipeError, match="labelled 'attn'"):
        build_recipes(load_sweep(bad), bad)


def test_best_learning_rate_follows_the_metrics_direction():
    runs = [RunResult(lr=1e-3, out_dir="", final_eval={"accuracy": 0.5, "bpb": 2.0}),
            RunResult(lr=3e-3, out_dir="", final_eval={"accuracy": 0.7, "bpb": 2.5}),
            RunResult(lr=1e-2, out_dir="", error="diverged: loss became nan")]
    assert higher_is_better("accuracy") and not higher_is_better("bpb")
    assert _pick_best(runs, "accuracy") == 1 and _pick_best(runs, "bpb") == 0
    assert _pick_best(runs[2:], "accuracy") is None


def test_compare_end_to_end_with_a_learning_rate_sweep(tmp_path, models):
    sweep_path = _sweep(tmp_path, models, lrs=[1e-3, 1e-2], smoke={"lrs": 2, "steps": 2})
    result = run_sweep(sweep_path, out_dir=tmp_path / "out", smoke=True, progress=False, echo=lambda _: None)
    assert [m.label for m in result.models] == ["attn", "ret"]
    for m in result.models:
        assert [r.lr for r in m.runs] == [1e-3, 1e-2] and all(r.error is None for r in m.runs)
        accs = [r.final_eval["accuracy"] for r in m.runs]
        assert m.best_run.final_eval["accuracy"] == max(accs)
        assert set(m.by_seq_len) == {16, 32} and 0 <= m.by_seq_len[32]["accuracy"] <= 1
        assert m.params > 0 and m.best_run.tokens_per_s > 0 and math.isfinite(m.best_run.wall_time_s)
        steps = [json.loads(line)["step"] for line in (Path(m.best_run.out_dir) / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["split"] == "train"]
        assert steps == [1, 2]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| attn | " in report and "| ret | " in report and "T=16*" in report and "lr=0.01" in report
    assert result.data_fingerprint in report
    for plot in result.plots:
        assert plot.read_bytes().startswith(PNG) and plot.stat().st_size > 5000
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [m["label"] for m in saved["models"]] == ["attn", "ret"] and saved["smoke"]

    # Continued with --reuse in two worker processes: nothing retrained, the same numbers.
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("model.safetensors")}
    (tmp_path / "out" / "attn" / "lr-0.001" / "compare_run.json").unlink()  # e.g. a run from `seqzoo train`
    again = run_sweep(sweep_path, out_dir=tmp_path / "out", smoke=True, progress=False, jobs=2, reuse=True)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("model.safetensors")} == mtimes
    assert math.isnan(again.models[0].runs[0].peak_memory_mb)  # not recorded, so not made up
    for before, after in zip(result.models, again.models):
        assert [r.final_eval for r in after.runs] == [r.final_eval for r in before.runs]
        assert after.by_seq_len == before.by_seq_len and after.best == before.best
    assert "2 models trained at a time" in (tmp_path / "out" / "report.md").read_text()


def test_a_diverging_model_is_reported_not_fatal(tmp_path, models, monkeypatch):
    import seqzoo.compare.runner as runner

    real = runner.train

    def diverge_ret(recipe, **kw):
        if recipe.name == "ret":
            raise TrainingDiverged("loss became nan at step 0")
        return real(recipe, **kw)

    monkeypatch.setattr(runner, "train", diverge_ret)
    sweep_path = _sweep(tmp_path, models, smoke={"steps": 1, "eval_seq_lens": [16]})
    result = run_sweep(sweep_path, out_dir=tmp_path / "out", smoke=True, progress=False, echo=lambda _: None)
    assert result.failed == ["ret"] and result.models[0].best_run is not None
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| ret | " in report and "## Failures" in report and "ret, lr=0.003: diverged" in report


@pytest.mark.parametrize("sweep", SWEEPS, ids=lambda p: p.stem)
def test_shipped_sweeps_validate(sweep, monkeypatch):
    monkeypatch.chdir(ROOT)
    spec = load_sweep(sweep)
    for smoke in (False, True):
        built = build_recipes(spec, sweep, smoke=smoke)
        assert len({r.model_dump_json(include={"task", "train"}) for _, _, r in built}) == 1
    assert spec.eval_seq_lens and max(spec.eval_seq_lens) > built[0][2].task["seq_len"]  # tests longer sequences


def test_cli_compare_smoke(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "mqar"
    assert main(["compare", "recipes/compare/mqar.yaml", "--smoke", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| model | params | lr | final accuracy |" in printed
    assert f"report: {out / 'report.md'}" in printed and f"plot: {out / 'metric_vs_seq_len.png'}" in printed
    assert (out / "loss_curves.png").read_bytes().startswith(PNG)


def test_cli_compare_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["compare", "--help"])
    assert info.value.code == 0 and "--smoke" in capsys.readouterr().out


def test_cli_compare_bad_sweep_exits_2(tmp_path, capsys):
    bad = _write(tmp_path / "s.yaml", {"name": "x", "models": ["a.yaml"]})
    assert main(["compare", str(bad), "--smoke"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "s.yaml: task" in err and "Traceback" not in err


def test_a_killed_worker_says_how_to_continue(tmp_path, models, monkeypatch):
    """A worker of --jobs killed mid-sweep (a signal, the OOM killer) breaks the whole pool:
    the error names the sweep, keeps the finished runs and says to continue with --reuse."""
    import concurrent.futures
    from concurrent.futures.process import BrokenProcessPool

    class KilledPool:  # the pool as it is once the OS has killed one of its workers
        def __init__(self, *args, **kwargs) -> None:
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            return None

        def map(self, fn, jobs):
            raise BrokenProcessPool("A process in the process pool was terminated abruptly")

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", KilledPool)
    sweep_path = _sweep(tmp_path, models)
    with pytest.raises(SeqzooError, match=r"sweep\.yaml: a worker process of --jobs 2 died .*--reuse"):
        run_sweep(sweep_path, out_dir=tmp_path / "out", smoke=True, progress=False, jobs=2)
