"""benchmarks/gpu_check.py on CPU (``--dry-run``, tiny sizes): its parity checks run on what
runs here (sdpa; fla's kernels in Triton's interpreter), in fp32 and bf16, pass for the real
kernels and fail, with exit status 1, for a kernel made wrong on purpose."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from seqzoo.kernels import is_available

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_dry_run_parity_passes_for_the_real_kernels(capsys):
    names = ["attention", "deltanet"]
    assert _gpu_check().main(["--dry-run", "--mixers", *names, "--budget-s", "0"]) == 0
    out = capsys.readouterr().out
    for dtype in ("fp32", "bf16"):
        assert f"| attention | sdpa | {dtype} |" in out
        if is_available("fla", "cpu"):
            assert f"| deltanet | fla | {dtype} |" in out
    assert "FAIL" not in out and "parity passed" in out
    assert "| deltanet | reference | 64 | skipped" in out  # --budget-s 0: no timing


@pytest.mark.slow
def test_dry_run_parity_fails_for_a_wrong_kernel(capsys, monkeypatch):
    import seqzoo.mixers.attention as attention

    real = attention.attend

    def off_by_a_little(q, k, v, mask, *, backend, **kw):
        o = real(q, k, v, mask, backend=backend, **kw)
        return o * (1 + 1e-3) if backend == "sdpa" else o

    monkeypatch.setattr(attention, "attend", off_by_a_little)
    assert _gpu_check().main(["--dry-run", "--mixers", "attention", "--budget-s", "0"]) == 1
    out = capsys.readouterr().out
    assert "| attention | sdpa | fp32 |" in out and "FAIL" in out and "parity FAILED" in out
