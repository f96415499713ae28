"""Every mixer with an fla backend, same weights, kernel vs reference: the outputs and the
gradient of every parameter over a ragged length, and decoding that continues a kernel
prefill with ``step`` (the state the kernel returns is the reference's state)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import assert_close, build_mixer, scan_steps
from tests.kernels.kernel_device import device_for

D_MODEL, T = 32, 70
CASES = {  # small but real head dims (16-32), every option a kernel must honour
    "retnet": {"n_heads": 2, "output_norm": "rms"},
    "gla": {"n_heads": 2, "expand_k": 1.0},
    "deltanet": {"n_heads": 2, "allow_neg_eigval": True, "use_gate": True},
    "gated_deltanet": {"n_heads": 2},
    "mamba2": {"headdim": 16, "d_state": 16, "n_groups": 2},
}


def _pair(name: str, device: torch.device):
    params = CASES[name]
    reference = build_mixer(name, {**params, "backend": "reference"}, d_model=D_MODEL, dtype=torch.float32).to(device)
    kernel = build_mixer(name, {**params, "backend": "fla"}, d_model=D_MODEL, dtype=torch.float32).to(device)
    assert reference.backend == "reference" and kernel.backend == "fla"
    return reference, kernel


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_mixer_equals_reference_with_gradients(name):
    device = device_for("fla")
    reference, kernel = _pair(name, device)
    x = torch.randn(1, T, D_MODEL, device=device)
    w = torch.randn(1, T, D_MODEL, device=device)
    for mixer in (reference, kernel):
        y, _ = mixer(x)
        (y * w).sum().backward()
    with torch.no_grad():
        assert_close(kernel(x)[0], reference(x)[0], torch.float32, f"{name}: output")
    for (pname, p), q in zip(kernel.named_parameters(), reference.parameters()):
        assert p.grad is not None, f"{name}: {pname} gets no gradient through the kernel"
        assert_close(p.grad, q.grad, torch.float32, f"{name}: gradient of {pname}")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_decode_continues_a_kernel_prefill(name):
    device = device_for("fla")
    reference, kernel = _pair(name, device)
    x = torch.randn(1, 40, D_MODEL, device=device)
    with torch.no_grad():
        y_ref, _ = reference(x)
        y_pre, state = kernel(x[:, :36])  # the kernel's state ...
        y_steps, _ = scan_steps(kernel, x[:, 36:], state)  # ... continued token by token
    assert_close(torch.cat([y_pre, y_steps], 1), y_ref, torch.float32, f"{name}: prefill + decode")
