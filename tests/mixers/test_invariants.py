"""The invariants of DESIGN.md section 3, run over every registered mixer with no extra code.

Hypothesis draws the batch, the length, the split point and the mixer's own small
hyper-parameters from its ``test_space`` (heads, chunk sizes, windows, ...).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from seqzoo import mixers
from seqzoo.mixers.base import iter_tensors
from tests.helpers import assert_close, build_mixer, scan_steps

NAMES = mixers.available()
D = 16
DTYPES = [torch.float64, torch.float32]


def draw_params(data, name: str) -> dict:
    space = mixers.get(name).test_space
    return {key: data.draw(st.sampled_from(values), label=key) for key, values in sorted(space.items())}


def draw_input(data, dtype, *, max_t: int = 20, min_t: int = 1):
    b = data.draw(st.integers(1, 2), label="B")
    t = data.draw(st.integers(min_t, max_t), label="T")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, D, generator=g, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_shape_and_finite_on_long_input(name, data):
    params = draw_params(data, name)
    mixer = build_mixer(name, params, dtype=torch.float32)
    x = draw_input(data, torch.float32, min_t=64, max_t=200) * 3
    y, state = mixer(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    assert all(torch.isfinite(s).all() for s in iter_tensors(state) if s.is_floating_point())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_causality(name, dtype, data):
    params = draw_params(data, name)
    mixer = build_mixer(name, params, dtype=dtype)
    x = draw_input(data, dtype, min_t=2)
    t = data.draw(st.integers(1, x.shape[1] - 1), label="t")
    x2 = x.clone()
    x2[:, t:] = torch.randn_like(x2[:, t:]) * 5
    with torch.no_grad():
        y, _ = mixer(x)
        y2, _ = mixer(x2)
    assert_close(y2[:, :t], y[:, :t], dtype, f"{name} {params}: output before t={t} changed")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_chaining_at_any_split(name, dtype, data):
    params = draw_params(data, name)
    mixer = build_mixer(name, params, dtype=dtype)
    x = draw_input(data, dtype, min_t=2)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, x.shape[1] - 1), min_size=1, max_size=3), label="cuts")))
    with torch.no_grad():
        y_full, s_full = mixer(x)
        pieces, state = [], None
        for lo, hi in zip([0, *cuts], [*cuts, x.shape[1]]):
            y, state = mixer(x[:, lo:hi], state)
            pieces.append(y)
    assert_close(torch.cat(pieces, 1), y_full, dtype, f"{name} {params} cuts={cuts}")
    for a, b in zip(iter_tensors(state), iter_tensors(s_full)):
        assert_close(a, b, dtype, f"{name} {params}: final state differs")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_step_scan_equals_forward(name, dtype, data):
    params = draw_params(data, name)
    mixer = build_mixer(name, params, dtype=dtype)
    x = draw_input(data, dtype)
    prefix = data.draw(st.integers(0, x.shape[1] - 1), label="prefix")  # decode after a prefill
    with torch.no_grad():
        y_full, _ = mixer(x)
        state = mixer.init_state(x.shape[0], device=x.device, dtype=dtype)
        y_pre, state = mixer(x[:, :prefix], state) if prefix else (x[:, :0], state)
        y_steps, _ = scan_steps(mixer, x[:, prefix:], state)
    assert_close(torch.cat([y_pre, y_steps], 1), y_full, dtype, f"{name} {params} prefix={prefix}")


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_state_is_not_mutated(name, data):
    params = draw_params(data, name)
    mixer = build_mixer(name, params)
    x = draw_input(data, torch.float64, min_t=2)
    with torch.no_grad():
        _, state = mixer(x[:, :1])
        before = [t.clone() for t in iter_tensors(state)]
        mixer(x[:, 1:], state)
        mixer.step(x[:, 1], state)
    for a, b in zip(iter_tensors(state), before):
        assert torch.equal(a, b), f"{name}: a state passed in was modified in place"


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_gradients_are_finite(name, data):
    params = draw_params(data, name)
    mixer = build_mixer(name, params, dtype=torch.float64).train()
    x = draw_input(data, torch.float64, min_t=2).requires_grad_()
    y, _ = mixer(x)
    (y * torch.randn_like(y)).sum().backward()
    assert torch.isfinite(x.grad).all()
    grads = [p.grad for p in mixer.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads), f"{name}: no parameter gets a gradient"
    assert all(torch.isfinite(g).all() for g in grads if g is not None)


@pytest.mark.parametrize("name", NAMES)
def test_describe_fields(name):
    mixer = build_mixer(name, {})
    assert mixer.backend in ("reference", *mixer.backends)
    assert mixer.state_size(2) >= 0


def _cpu_backends(name: str) -> list[str]:
    from seqzoo.kernels import is_available

    return [b for b in mixers.get(name).backends if is_available(b, "cpu")]


def _kernel_cases(*, interpreted: bool) -> list[tuple[str, str, torch.dtype]]:
    from seqzoo.kernels import computes
    from seqzoo.kernels import interpreted as is_interpreted

    return [(n, b, d) for n in NAMES for b in _cpu_backends(n) for d in DTYPES
            if computes(b, d) and is_interpreted(b, "cpu") == interpreted]


def _kernel_equals_reference(name: str, backend: str, dtype: torch.dtype, data) -> None:
    params = draw_params(data, name)
    reference = build_mixer(name, {**params, "backend": "reference"}, dtype=dtype)
    kernel = build_mixer(name, {**params, "backend": backend}, dtype=dtype)
    assume(kernel.kernel_limits(backend) is None)  # a configuration the kernel cannot compute is refused
    assert reference.backend == "reference" and kernel.backend == backend
    x = draw_input(data, dtype, min_t=2)
    split = data.draw(st.integers(1, x.shape[1] - 1), label="split")
    with torch.no_grad():
        y_ref, s_ref = reference(x)
        y1, s = kernel(x[:, :split])
        y2, s = kernel(x[:, split:], s)
    assert_close(torch.cat([y1, y2], 1), y_ref, dtype, f"{name} {backend} {params}")
    for a, b in zip(iter_tensors(s), iter_tensors(s_ref)):
        assert_close(a, b, dtype, f"{name} {backend} {params}: final state differs")


NATIVE_CASES = _kernel_cases(interpreted=False)
INTERPRETED_CASES = _kernel_cases(interpreted=True)


@pytest.mark.skipif(not NATIVE_CASES, reason="no kernel backend runs natively on this CPU")
@pytest.mark.parametrize("name, backend, dtype", NATIVE_CASES, ids=str)
@given(data=st.data())
def test_kernel_equals_reference(name, backend, dtype, data):
    """Invariant 5: each fast path that can run here equals the reference, same weights,
    chained across a split (states through the kernel)."""
    _kernel_equals_reference(name, backend, dtype, data)


@pytest.mark.slow
@pytest.mark.skipif(not INTERPRETED_CASES, reason="no kernel runs under Triton's interpreter here (TRITON_INTERPRET)")
@pytest.mark.parametrize("name, backend, dtype", INTERPRETED_CASES, ids=str)
@settings(max_examples=3)  # 0.1-1 s per interpreted kernel call; tests/kernels covers them in depth
@given(data=st.data())
def test_interpreted_kernel_equals_reference(name, backend, dtype, data):
    """Invariant 5 for kernels that run on CPU only in Triton's interpreter (fla)."""
    _kernel_equals_reference(name, backend, dtype, data)
