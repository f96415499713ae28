"""``seqzoo compare``: several recipes trained on one task by the same harness, with the
same data order, seed, steps, optimiser and schedule, then a markdown report and plots."""

from seqzoo.compare.runner import CompareResult, ModelResult, run_sweep
from seqzoo.compare.schema import Sweep, load_sweep

__all__ = ["CompareResult", "ModelResult", "Sweep", "load_sweep", "run_sweep"]
