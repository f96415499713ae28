"""Sweep seeds and claims: mean ± std over seeds, the best learning rate by seed mean, claims
validated before training and checked on the measurements, `--strict`, and `--reuse`
continuing an interrupted run exactly."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from seqzoo.cli import main
from seqzoo.compare import load_sweep, run_sweep
from seqzoo.compare.claims import check
from seqzoo.compare.report import _styles, family
from seqzoo.compare.runner import RunResult, _pick_best, build_recipes, higher_is_better
from seqzoo.errors import RecipeError

ROOT = Path(__file__).resolve().parents[2]
LABELS = ["attention-d64", "attention-d128", "mamba", "titans"]


def _claim(**kw):
    return load_sweep_claims([kw])[0]


def load_sweep_claims(claims: list[dict]) -> list:
    from pydantic import TypeAdapter

    from seqzoo.compare.claims import Claim

    return [TypeAdapter(Claim).validate_python(c) for c in claims]


def _values(table: dict[tuple[str, int], list[float]]):
    return lambda label, n, metric: table.get((label, n), [])


def _check(claim, table, metric_hib=higher_is_better):
    return check(claim, LABELS, _values(table), headline="accuracy", train_len=64, higher_is_better=metric_hib)


def test_threshold_claim_holds_on_the_seed_mean_of_every_model_it_picks():
    claim = _claim(kind="threshold", claim="attention solves MQAR", source="Zoology fig. 2", models=["attention-*"],
                   at_least=0.99)
    good = {("attention-d64", 64): [0.995, 0.999, 0.991], ("attention-d128", 64): [1.0, 1.0]}
    result = _check(claim, good)
    assert result.holds and "attention-d64 0.995 ± 0.004 (3 seeds)" in result.measured and "attention-d128 1.000" in result.measured
    # One width falls short on its mean (though one seed reached the bound): the claim fails.
    bad = {**good, ("attention-d128", 64): [0.999, 0.95]}
    assert not _check(claim, bad).holds
    # A model with no finished run cannot support a claim.
    missing = {("attention-d64", 64): [1.0]}
    result = _check(claim, missing)
    assert not result.holds and "no finished run" in result.measured
    at_most = _claim(kind="threshold", claim="[0,1] fails", source="Grazzi table 3", models=["mamba"], at_most=0.1,
                     seq_lens=[64, 256])
    assert _check(at_most, {("mamba", 64): [0.05], ("mamba", 256): [0.02]}).holds
    assert not _check(at_most, {("mamba", 64): [0.05], ("mamba", 256): [0.3]}).holds


def test_order_and_degradation_claims_follow_the_metrics_direction():
    order = _claim(kind="order", claim="titans beats mamba", source="s", better=["titans"], worse=["mamba"])
    assert _check(order, {("titans", 64): [0.9, 0.8], ("mamba", 64): [0.7, 0.9]}).holds  # 0.85 >= 0.80
    assert not _check(order, {("titans", 64): [0.7], ("mamba", 64): [0.75]}).holds
    with_margin = _claim(kind="order", claim="c", source="s", better=["titans"], worse=["mamba"], margin=0.1)
    assert not _check(with_margin, {("titans", 64): [0.85], ("mamba", 64): [0.8]}).holds
    lower = _claim(kind="order", claim="c", source="s", better=["titans"], worse=["mamba"], metric="bpb")
    assert _check(lower, {("titans", 64): [1.9], ("mamba", 64): [2.0]}).holds  # bits per byte: lower is better
    faster = _claim(kind="degrades_faster", claim="mamba forgets", source="Titans table 2", faster=["mamba"],
                    slower=["titans"], to_len=512)
    table = {("mamba", 64): [0.99, 0.97], ("mamba", 512): [0.3, 0.5], ("titans", 64): [0.99, 0.99],
             ("titans", 512): [0.9, 0.95]}
    result = _check(faster, table)
    assert result.holds and "mamba drop 0.580 ± 0.156 (2 seeds)" in result.measured
    table[("titans", 512)] = [0.1, 0.1]
    assert not _check(faster, table).holds
    # A model at chance has nothing to lose: with min_at_start it cannot make the claim hold.
    guarded = _claim(kind="degrades_faster", claim="c", source="s", faster=["mamba"], slower=["titans"], to_len=512,
                     min_at_start=0.5)
    chance = {("mamba", 64): [0.99], ("mamba", 512): [0.5], ("titans", 64): [0.06], ("titans", 512): [0.06]}
    assert _check(faster, chance).holds  # vacuous without the guard
    result = _check(guarded, chance)
    assert not result.holds and "not reached by titans (0.060)" in result.measured
    chance[("titans", 64)] = chance[("titans", 512)] = [0.97]
    assert _check(guarded, chance).holds


def test_claims_are_strict():
    with pytest.raises(Exception, match="exactly one of at_least and at_most"):
        _claim(kind="threshold", claim="c", source="s", models=["x"])
    with pytest.raises(Exception, match="at_leest"):
        _claim(kind="threshold", claim="c", source="s", models=["x"], at_leest=1)
    with pytest.raises(Exception):
        _claim(kind="beats", claim="c", source="s")
    with pytest.raises(Exception):
        _claim(kind="order", claim="c", better=["a"], worse=["b"])  # a claim needs its source


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def sweep_file(tmp_path) -> callable:
    model = _write(tmp_path / "a.yaml", {"name": "attn", "model": {"d_model": 16, "n_layers": 1, "mixers": {
        "m": {"type": "attention", "n_heads": 2}}}})
    ret = _write(tmp_path / "b.yaml", {"name": "ret", "model": {"d_model": 16, "n_layers": 1, "mixers": {
        "m": {"type": "retnet", "n_heads": 2}}}})

    def make(**extra) -> Path:
        data = {"name": "t", "task": {"type": "mqar", "seq_len": 16, "num_kv_pairs": 2, "vocab_size": 16},
                "train": {"steps": 4, "batch_size": 4, "eval_batches": 1, "eval_every": 2, "log_every": 1,
                          "warmup_steps": 1, "ckpt_every": 2},
                "eval_seq_lens": [16, 32], "eval_batches": 2, "models": [str(model), str(ret)], **extra}
        return _write(tmp_path / "sweep.yaml", data)

    return make


def test_claims_naming_what_the_sweep_does_not_measure_are_refused_before_training(sweep_file):
    cases = [({"kind": "threshold", "claim": "c", "source": "s", "models": ["attention"], "at_least": 0.9},
              r"claims\[0\]\.models\[0\]: no model is labelled like 'attention'; models: attn, ret"),
             ({"kind": "order", "claim": "c", "source": "s", "better": ["attn"], "worse": ["ret"], "metric": "bpb"},
              r"claims\[0\]\.metric: the task reports accuracy, loss, not 'bpb'"),
             ({"kind": "degrades_faster", "claim": "c", "source": "s", "faster": ["attn"], "slower": ["r*"],
               "to_len": 64}, r"claims\[0\]\.to_len: 64 is not a tested length")]
    for claim, message in cases:
        path = sweep_file(claims=[claim])
        with pytest.raises(RecipeError, match=message):
            build_recipes(load_sweep(path), path)
    path = sweep_file(claims=[{"kind": "order", "claim": "c", "source": "s", "better": ["attn"], "worse": ["ret"],
                               "typo": 1}])
    with pytest.raises(RecipeError, match=r"sweep.yaml: claims\.0\.order\.typo|claims\[0\]"):
        load_sweep(path)
    with pytest.raises(RecipeError, match="seeds"):
        load_sweep(sweep_file(seeds=[0, 0]))


def test_seeds_mean_and_std_one_measurement_for_final_and_length_columns_and_strict(sweep_file, tmp_path, capsys):
    claims = [{"kind": "threshold", "claim": "anything trains", "source": "this test", "models": ["*"],
               "at_least": 0.0},
              {"kind": "threshold", "claim": "perfect recall after 4 steps", "source": "nobody", "models": ["attn"],
               "at_least": 1.01}]
    path = sweep_file(seeds=[0, 1], lrs=[1e-3, 1e-2], claims=claims, smoke={"steps": 4, "seeds": 2, "lrs": 2,
                                                                          "eval_batches": 2})
    out = tmp_path / "out"
    result = run_sweep(path, out_dir=out, smoke=True, progress=False, echo=lambda _: None)
    assert result.seeds == [0, 1]
    for m in result.models:
        assert sorted((r.lr, r.seed) for r in m.runs) == [(1e-3, 0), (1e-3, 1), (1e-2, 0), (1e-2, 1)]
        assert {Path(r.out_dir).name for r in m.runs} == {"seed-0", "seed-1"}
        chosen = m.best_runs()
        assert len(chosen) == 2 and chosen[0].final_eval != chosen[1].final_eval  # seeds differ in init
        # The best learning rate is the best seed mean.
        means = {lr: sum(r.final_eval["accuracy"] for r in m.runs if r.lr == lr) / 2 for lr in (1e-3, 1e-2)}
        assert means[m.best_lr] == max(means.values())
        # The final column and the training-length column are one measurement.
        assert m.seed_evals[16] == [r.final_eval for r in chosen]
        accs = [r.final_eval["accuracy"] for r in chosen]
        assert math.isclose(m.by_seq_len[16]["accuracy"], sum(accs) / 2)
        assert math.isclose(m.by_seq_len_std[16]["accuracy"], abs(accs[0] - accs[1]) / math.sqrt(2))
    assert [r.holds for r in result.claims] == [True, False]
    report = (out / "report.md").read_text()
    assert "## Claims" in report and "1 of 2 published results hold" in report and "**fails**" in report
    assert " ± " in report and "| seeds |" in report
    saved = json.loads((out / "results.json").read_text())
    assert [c["holds"] for c in saved["claims"]] == [True, False] and saved["seeds"] == [0, 1]

    # The CLI reports the failed claim; --strict makes it an error.
    args = ["compare", str(path), "--smoke", "--out", str(out), "--no-progress", "--reuse"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "claims (1 of 2 hold)" in captured.out and "warning: 1 claim(s) fail" in captured.err
    assert main(args + ["--strict"]) == 1
    assert "error: 1 claim(s) fail: perfect recall after 4 steps" in capsys.readouterr().err


def test_reuse_resumes_an_interrupted_run_exactly(sweep_file, tmp_path):
    path = sweep_file()  # not a smoke run: that checkpoints only at its end
    out = tmp_path / "out"
    first = run_sweep(path, out_dir=out, progress=False, echo=lambda _: None)
    # Interrupt `attn` after its step-2 checkpoint: its final checkpoint and record are gone.
    run_dir = Path(first.models[0].best_run.out_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step-0000004")
    (run_dir / "checkpoints" / "latest.json").unlink(missing_ok=True)
    (run_dir / "compare_run.json").unlink()
    said: list[str] = []
    again = run_sweep(path, out_dir=out, progress=False, reuse=True, echo=said.append)
    assert any("[attn]" in s and "resumed at step 2" in s for s in said), said
    assert any("[ret]" in s and "reused" in s for s in said), said
    for before, after in zip(first.models, again.models):
        assert after.best_run.final_eval == before.best_run.final_eval  # exact resume: the same numbers
        assert after.by_seq_len == before.by_seq_len


def test_reuse_retrains_when_the_library_defaults_build_another_model(sweep_file, tmp_path, monkeypatch):
    """The same recipe is not the same model when a default it leaves out has changed: such a
    run is trained again, never loaded into (or reported as) a different model."""
    from seqzoo.compare import runner
    from seqzoo.train import checkpoint as ckpt

    path = sweep_file()
    out = tmp_path / "out"
    first = run_sweep(path, out_dir=out, progress=False, echo=lambda _: None)
    run_dir = Path(first.models[0].best_run.out_dir)  # `attn`, whose recipe names no conv_size
    record = json.loads((run_dir / "resolved_model.json").read_text())
    assert record["layers"][0]["type"] == "attention" and record["layers"][0]["conv_size"] is None

    resolved = runner.resolved_model

    def new_default(recipe):  # as if attention's conv_size defaulted to 4 from now on
        now = resolved(recipe)
        for layer in now["layers"]:
            if layer["type"] == "attention":
                layer["conv_size"] = 4
        return now

    monkeypatch.setattr(runner, "resolved_model", new_default)
    said: list[str] = []
    run_sweep(path, out_dir=out, progress=False, reuse=True, echo=said.append)
    assert any("defaults now build a different model: retraining" in s for s in said), said
    assert not any("[attn]" in s and ("reused" in s or "resumed" in s) for s in said), said
    assert any("[ret]" in s and "reused" in s for s in said), said  # retnet's model did not change
    assert json.loads((run_dir / "resolved_model.json").read_text())["layers"][0]["conv_size"] == 4

    # A run without the record (interrupted, or older than it): the checkpoint's parameter
    # names and shapes must be today's model's.
    monkeypatch.setattr(runner, "resolved_model", resolved)
    (run_dir / "resolved_model.json").unlink()
    latest = ckpt.latest_checkpoint(run_dir)
    recipe = runner.Recipe.model_validate(ckpt.read_state(latest)["recipe"])
    assert runner._same_model(run_dir, latest, recipe)
    conv = recipe.model_copy(update={"model": recipe.model.model_copy(update={"mixers": {
        "m": {"type": "attention", "n_heads": 2, "conv_size": 4}}})})
    assert not runner._same_model(run_dir, latest, conv)  # the conv's weights are not in the checkpoint


def test_pick_best_prefers_learning_rates_where_every_seed_finished():
    runs = [RunResult(lr=1e-3, out_dir="", final_eval={"accuracy": 0.6}, seed=0),
            RunResult(lr=1e-3, out_dir="", final_eval={"accuracy": 0.5}, seed=1),
            RunResult(lr=1e-2, out_dir="", final_eval={"accuracy": 0.9}, seed=0),
            RunResult(lr=1e-2, out_dir="", error="diverged: nan", seed=1)]
    assert _pick_best(runs, "accuracy") == 0  # 1e-2's one good seed does not outrank a stable lr
    assert _pick_best(runs[2:], "accuracy") == 0  # when no lr has every seed, the finished ones count


def test_plot_styles_stay_distinct_for_many_models_and_families_group_them():
    styles = [(s["color"], s["ls"], s["marker"]) for s in _styles(40)]
    assert len(set(styles)) == 40
    assert family(["attention"]) == "attention" and family(["titans_mac"]) == "Titans"
    assert family(["mamba", "attention"]) == "hybrid" and family(["deltanet", "gated_deltanet"]) == "delta rule"


def test_many_models_are_plotted_in_family_panels(tmp_path):
    from seqzoo.compare.report import _panels
    from seqzoo.compare.runner import ModelResult

    class C:
        models = [ModelResult(label=f"m{i}", recipe_path="", params=1, runs=[], best=None,
                              family=["attention", "Titans", "SSM (Mamba)"][i % 3]) for i in range(14)]

    panels = _panels(C, [m.label for m in C.models])
    assert [t for t, _ in panels] == ["attention", "Titans", "SSM (Mamba)"]
    assert sum(len(ls) for _, ls in panels) == 14
    assert _panels(C, ["m0", "m1"]) == [("", ["m0", "m1"])]


SHIPPED_SWEEPS = sorted(p for d in ("compare", "reproduce") for p in (ROOT / "recipes" / d).glob("*.yaml"))


@pytest.mark.parametrize("sweep_path", SHIPPED_SWEEPS, ids=lambda p: p.stem)
def test_the_resolved_model_of_every_shipped_sweep_builds(sweep_path):
    """--reuse records every run's resolved model, built on the meta device; every shipped
    task must give its vocabulary there (S5's comes from a multiplication table of tensors)."""
    from seqzoo.compare import runner

    for _, _, recipe in runner.build_recipes(load_sweep(sweep_path), sweep_path, smoke=True):
        resolved = runner.resolved_model(recipe)
        assert resolved["params"]["embed.weight"][0] == recipe.vocab_size()
