"""The recipe fuzzer in CI: mutated copies of every recipe and sweep in ``recipes/`` go through
the real CLI (``describe`` and a 1-step ``train``, or ``compare --smoke``) in this process.
Any traceback, hang, multi-line error, non-finite number reported as success, or invalid
document accepted fails the test. A bounded number of examples here (SEQZOO_FUZZ_EXAMPLES);
``tests/fuzz/long_run.py`` runs thousands and prints the counts."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings

from tests.fuzz import harness

BASES = harness.bases()
RECIPES = [b for b in BASES if b.kind == "recipe"]
SWEEPS = [b for b in BASES if b.kind == "sweep"]
FUZZ = settings(max_examples=int(os.environ.get("SEQZOO_FUZZ_EXAMPLES", "30")), deadline=None,
                suppress_health_check=list(HealthCheck))


def _check(base, data, notes, must_reject):
    with tempfile.TemporaryDirectory() as tmp, harness.memory_ceiling():
        outcomes = harness.run_case(base, data, must_reject, Path(tmp))
    failures = [o for o in outcomes if o.kind in harness.FAILURES]
    assert not failures, harness.describe_case(base, notes, outcomes)


def test_the_fuzzer_sees_every_recipe_and_sweep():
    assert len(RECIPES) >= 30 and len(SWEEPS) >= 7  # recipes/*.yaml, paper-340m/, compare/


@FUZZ
@given(case=harness.fuzz_case(RECIPES))
def test_fuzzed_recipes_never_crash_hang_or_lie(case):
    _check(*case)


@settings(FUZZ, max_examples=max(1, FUZZ.max_examples // 4))
@given(case=harness.fuzz_case(SWEEPS))
def test_fuzzed_sweeps_never_crash_hang_or_lie(case):
    _check(*case)
