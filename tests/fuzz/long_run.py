"""The fuzzer's long run (not CI): thousands of examples, every outcome counted, the failures
listed. One thread; takes a while.

    OMP_NUM_THREADS=1 PYTHONPATH=. python tests/fuzz/long_run.py --examples 3000 --json runs/fuzz.json
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

from hypothesis import HealthCheck, given, seed, settings

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.fuzz import harness  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=3000, help="examples per kind (recipes; sweeps get a quarter)")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed (the same examples for the same seed)")
    parser.add_argument("--json", help="write the counts and failures here")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    counts: collections.Counter[str] = collections.Counter()
    failures: list[str] = []
    per_base: collections.Counter[str] = collections.Counter()
    examples = collections.Counter()
    t0 = time.time()

    def record(case) -> None:
        base, data, notes, must_reject = case
        try:
            with tempfile.TemporaryDirectory() as tmp, harness.memory_ceiling():
                outcomes = harness.run_case(base, data, must_reject, Path(tmp))
        except Exception as err:  # noqa: BLE001 - counted, so that one bug does not end the run
            outcomes = [harness.Outcome("harness", "traceback", f"{type(err).__name__}: {err}"[:300])]
        examples[base.kind] += 1
        per_base[str(base.path.relative_to(harness.ROOT))] += 1
        counts["must_reject"] += must_reject
        for o in outcomes:
            counts[f"{o.command}:{o.kind}"] += 1
        bad = [o for o in outcomes if o.kind in harness.FAILURES]
        if bad:
            failures.append(harness.describe_case(base, notes, outcomes))
            print("FAIL", failures[-1], flush=True)
        n = sum(examples.values())
        if n % 100 == 0:
            print(f"{n} examples, {time.time() - t0:.0f} s, {dict(counts)}", flush=True)

    for kind, n in (("recipe", args.examples), ("sweep", max(1, args.examples // 4))):
        bases = [b for b in harness.bases() if b.kind == kind]
        run = seed(args.seed)(settings(max_examples=n, deadline=None, database=None, derandomize=False,
                                       suppress_health_check=list(HealthCheck))(given(case=harness.fuzz_case(bases))(record)))
        run()
    summary = {"examples": dict(examples), "outcomes": dict(counts), "failures": failures,
               "hangs": sum(v for k, v in counts.items() if k.endswith(":hang")),
               "tracebacks": sum(v for k, v in counts.items() if k.endswith(":traceback")),
               "accepted_invalid": sum(v for k, v in counts.items() if k.endswith(":accepted_invalid")),
               "bases": dict(per_base), "wall_s": round(time.time() - t0)}
    print(json.dumps({k: v for k, v in summary.items() if k != "bases"}, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
