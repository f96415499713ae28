"""The fuzzer can fail: its harness classifies an escaped exception, a hang, a multi-line
error, a NaN reported as success and an invalid document accepted, each as a failure."""

from __future__ import annotations

import json
import sys
import time

import pytest

import seqzoo.cli as cli
from tests.fuzz import harness


def _outcome(monkeypatch, behaviour, *, timeout_s: float = 30.0) -> harness.Outcome:
    monkeypatch.setitem(cli.COMMANDS, "describe", behaviour)
    return harness._classify("describe", *harness._run_cli(["describe", "x.yaml"], timeout_s=timeout_s))


def test_each_kind_of_failure_is_seen(monkeypatch, tmp_path):
    def crash(args):
        raise ValueError("a bug")

    def hang(args):
        time.sleep(30)

    def two_lines(args):
        print("error: one\nerror: two", file=sys.stderr)
        return 2

    def fine(args):
        return 0

    def refuse(args):
        raise cli.SeqzooError("x.yaml: model.d_model: expected an integer")

    assert _outcome(monkeypatch, crash).kind == "traceback"
    assert _outcome(monkeypatch, hang, timeout_s=0.5).kind == "hang"
    assert _outcome(monkeypatch, two_lines).kind == "multiline"
    assert _outcome(monkeypatch, fine).kind == "ok"
    rejected = _outcome(monkeypatch, refuse)
    assert rejected.kind == "rejected" and "model.d_model" in rejected.detail
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "split": "eval", "bpb": float("nan")}) + "\n")
    assert harness._check_train_output(tmp_path).kind == "nonfinite"
    base = next(b for b in harness.bases() if b.path.name == "tiny-attention.yaml")
    monkeypatch.setitem(cli.COMMANDS, "describe", fine)
    monkeypatch.setattr(harness, "_params", lambda path: 10**9)  # describe only
    outcomes = harness.run_case(base, b"name: ok\n", True, tmp_path)
    assert [o.kind for o in outcomes] == ["accepted_invalid"]


@pytest.mark.parametrize("name", ["tiny-attention.yaml", "mqar.yaml"])
def test_the_shrunk_bases_are_valid_and_quick(name, tmp_path):
    """Unmutated, a shrunk document trains (or compares) successfully: the fuzzer's
    failures come from its mutations, not from its starting points."""
    base = next(b for b in harness.bases() if b.path.name == name)
    data = harness.dump(harness.shrink(base, pick=0)).encode()
    with harness.memory_ceiling():
        outcomes = harness.run_case(base, data, False, tmp_path)
    assert outcomes and all(o.kind == "ok" for o in outcomes), outcomes
