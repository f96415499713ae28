"""The reproduction suite (recipes/reproduce/): every sweep validates strictly, carries claims
with their sources, has a GPU-scale twin, and runs end to end as a --smoke (what CI runs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from seqzoo.cli import main
from seqzoo.compare import load_sweep
from seqzoo.compare.runner import build_recipes

ROOT = Path(__file__).resolve().parents[2]
REPRO = ROOT / "recipes" / "reproduce"
CPU = sorted(p for p in REPRO.glob("*.yaml") if "-gpu" not in p.stem)
GPU = sorted(REPRO.glob("*-gpu*.yaml"))


def test_every_cpu_reproduction_has_a_gpu_scale_twin():
    assert {p.stem for p in CPU} == {"state-tracking", "titans-ablations", "titans-mqar", "titans-mqar-16pairs", "titans-mqar-hybrids",
                                     "titans-niah", "zoology-mqar"}
    for p in CPU:
        assert any(g.stem.startswith(p.stem + "-gpu") for g in GPU), p.stem


@pytest.mark.parametrize("sweep", CPU + GPU, ids=lambda p: p.stem)
def test_reproductions_validate_and_carry_sourced_claims(sweep, monkeypatch):
    monkeypatch.chdir(ROOT)
    spec = load_sweep(sweep)
    assert spec.claims and all(c.source.strip() for c in spec.claims)
    for smoke in (False, True):
        build_recipes(spec, sweep, smoke=smoke)  # claims refer to models, metrics and lengths it measures
    if "-gpu" in sweep.stem:
        assert spec.seeds is not None and len(spec.seeds) >= 3 and spec.lrs and len(spec.lrs) >= 3


@pytest.mark.parametrize("sweep", CPU, ids=lambda p: p.stem)
def test_reproduction_smoke_runs_end_to_end(sweep, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    out = tmp_path / sweep.stem
    assert main(["compare", str(sweep.relative_to(ROOT)), "--smoke", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "claims (" in printed and "| claim | source | measured | verdict |" in printed
    report = (out / "report.md").read_text()
    assert "## Claims" in report and "a smoke run" in report
