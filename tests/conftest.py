from __future__ import annotations

import os
import sys

import torch
from hypothesis import HealthCheck, settings

# Without a GPU, flash-linear-attention's Triton kernels run in Triton's CPU interpreter, so
# that the suite proves them equal to the references (``backend: fla``; ``auto`` never picks
# them on CPU). The interpreter is chosen when triton is imported, so this must come first;
# with a GPU (or an explicit TRITON_INTERPRET) the kernels run as they are.
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist each worker gets one thread, so workers don't fight over the cores.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))

settings.register_profile(
    "ci",
    max_examples=8,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("thorough", max_examples=100, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("SEQZOO_HYPOTHESIS_PROFILE", "ci"))
