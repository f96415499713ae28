"""The CUDA-only bindings (mamba-ssm, causal-conv1d) against the reference, same weights:
outputs, chaining through the kernels' states and parameter gradients, fp32. They skip
without CUDA and the packages (``benchmarks/gpu_check.py`` runs them with bf16 as well)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import assert_close, build_mixer
from tests.kernels.kernel_device import device_for

CASES = [
    ("mamba", "mamba_ssm", {"d_state": 16}),
    ("mamba", "mamba_ssm+causal_conv1d", {"d_state": 16}),
    ("mamba2", "mamba_ssm", {"headdim": 16, "d_state": 16, "n_groups": 2}),
    ("mamba2", "mamba_ssm+causal_conv1d", {"headdim": 16, "d_state": 16}),
    ("mamba2", "fla+causal_conv1d", {"headdim": 16, "d_state": 16}),
    ("deltanet", "fla+causal_conv1d", {"n_heads": 2}),
    ("gated_deltanet", "fla+causal_conv1d", {"n_heads": 2}),
]


@pytest.mark.parametrize("name, backend, params", CASES, ids=lambda c: str(c))
def test_cuda_kernel_equals_reference(name, backend, params):
    device = device_for(backend)
    if device.type != "cuda":
        pytest.skip(f"{backend} runs on CUDA only")
    reference = build_mixer(name, {**params, "backend": "reference"}, d_model=64, dtype=torch.float32).to(device)
    kernel = build_mixer(name, {**params, "backend": backend}, d_model=64, dtype=torch.float32).to(device)
    assert kernel.backend == backend
    x = torch.randn(2, 300, 64, device=device)
    w = torch.randn_like(x)
    for mixer in (reference, kernel):
        y, _ = mixer(x)
        (y * w).sum().backward()
    with torch.no_grad():
        y_ref, s_ref = reference(x)
        y1, s = kernel(x[:, :171])
        y2, s = kernel(x[:, 171:], s)
    assert_close(torch.cat([y1, y2], 1), y_ref, torch.float32, f"{name} {backend}: chained output")
    for (pname, p), q in zip(kernel.named_parameters(), reference.parameters()):
        assert_close(p.grad, q.grad, torch.float32, f"{name} {backend}: gradient of {pname}")
