"""Retention: the fixed multi-scale decay, recurrent == chunked == parallel (any T, chunk,
split), gradients, and flash-linear-attention's naive references as oracles (fp32, fp64)."""

from __future__ import annotations

import math

import pytest
import torch
from einops import rearrange
from hypothesis import given
from hypothesis import strategies as st

from seqzoo.ops.retention import (
    retention,
    retention_log_decay,
    retention_parallel,
    retention_recurrent,
    retention_step,
)
from tests.helpers import assert_close
from tests.ops import fla_oracle

DTYPES = [torch.float64, torch.float32]


def make_inputs(b: int, t: int, h: int, dk: int, dv: int, *, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    return rand(b, t, h, dk), rand(b, t, h, dk), rand(b, t, h, dv), rand(b, h, dk, dv)


shapes = st.fixed_dictionaries({
    "b": st.integers(1, 2), "t": st.integers(1, 40), "h": st.integers(1, 4),
    "dk": st.integers(1, 6), "dv": st.integers(1, 5), "seed": st.integers(0, 2**16),
})


def test_decay_is_one_minus_two_to_minus_five_minus_h():
    gamma = retention_log_decay(4).exp()
    assert_close(gamma, torch.tensor([1 - 1 / 32, 1 - 1 / 64, 1 - 1 / 128, 1 - 1 / 256], dtype=torch.float64))


def test_step_decays_the_state_by_gamma_h():
    # With k = v = 0 a step only decays: S -> gamma_h S, head by head.
    s0 = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    zeros = torch.zeros(2, 3, 4, dtype=torch.float64)
    _, s1 = retention_step(zeros, zeros, torch.zeros(2, 3, 5, dtype=torch.float64), s0)
    gammas = [1 - 2.0 ** (-5 - h) for h in range(3)]
    for h, gamma in enumerate(gammas):
        assert_close(s1[:, h], gamma * s0[:, h])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(shape=shapes, chunk=st.integers(1, 24), with_state=st.booleans(), scale=st.sampled_from([None, 0.7]))
def test_chunked_and_parallel_equal_recurrent(dtype, shape, chunk, with_state, scale):
    q, k, v, s0 = make_inputs(**shape, dtype=dtype)
    s0 = s0 if with_state else None
    o_ref, s_ref = retention_recurrent(q, k, v, initial_state=s0, output_final_state=True, scale=scale)
    o, s = retention(q, k, v, chunk_size=chunk, initial_state=s0, output_final_state=True, scale=scale)
    assert_close(o, o_ref, dtype, f"chunked, chunk={chunk}")
    assert_close(s, s_ref, dtype, "chunked final state")
    o, s = retention_parallel(q, k, v, initial_state=s0, output_final_state=True, scale=scale)
    assert_close(o, o_ref, dtype, "parallel")
    assert_close(s, s_ref, dtype, "parallel final state")


@given(shape=shapes, chunk=st.integers(1, 16), data=st.data())
def test_any_split_point(shape, chunk, data):
    q, k, v, _ = make_inputs(**shape, dtype=torch.float64)
    cuts = sorted(data.draw(st.lists(st.integers(0, q.shape[1]), min_size=1, max_size=3), label="cuts"))
    o_full, s_full = retention(q, k, v, chunk_size=chunk, output_final_state=True)
    pieces, state = [], None
    for lo, hi in zip([0, *cuts], [*cuts, q.shape[1]]):
        o, state = retention(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], chunk_size=chunk, initial_state=state,
                             output_final_state=True)
        pieces.append(o)
    assert_close(torch.cat(pieces, 1), o_full, torch.float64, f"cuts={cuts}")
    assert_close(state, s_full, torch.float64)


def test_gradients_chunked_equal_recurrent():
    q, k, v, s0 = make_inputs(2, 37, 3, 4, 5, dtype=torch.float64, seed=7)
    inputs = [z.clone().requires_grad_() for z in (q, k, v, s0)]

    def grads(fn, **kw):
        o, s = fn(*inputs[:3], initial_state=inputs[3], output_final_state=True, **kw)
        gen = torch.Generator().manual_seed(0)  # randn(shape), not randn_like: o may be strided
        loss = (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum()
        loss = loss + (s * torch.randn(s.shape, generator=gen, dtype=s.dtype)).sum()
        return torch.autograd.grad(loss, inputs)

    ref = grads(retention_recurrent)
    for fn, kw in [(retention, {"chunk_size": 8}), (retention, {"chunk_size": 64}), (retention_parallel, {})]:
        for name, a, b in zip("q k v s0".split(), grads(fn, **kw), ref):
            assert_close(a, b, torch.float64, f"{fn.__name__} {kw}: d{name}")


def test_long_sequence_stays_finite_in_fp32():
    q, k, v, _ = make_inputs(1, 3000, 2, 8, 8, dtype=torch.float32, seed=0)
    o, s = retention(q, k, v, chunk_size=64, output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()


# -- external oracles ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(shape=shapes, chunk=st.sampled_from([1, 7, 16, 64]))
def test_equals_fla_naive_retention(dtype, shape, chunk):
    ref = fla_oracle.naive("retention")
    q, k, v, _ = make_inputs(**shape, dtype=dtype)
    # fla's naive_retention takes (B, H, T, D) and always uses scale K^-1/2, no state.
    heads_first = [rearrange(z, "b t h d -> b h t d") for z in (q, k, v)]  # (B, H, T, D)
    o_ref = fla_oracle.call(ref.naive_retention, *heads_first, dtype=dtype)
    o, _ = retention(q, k, v, chunk_size=chunk)
    assert_close(o, rearrange(o_ref, "b h t d -> b t h d").to(dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(shape=shapes, chunk=st.sampled_from([1, 5, 64]), scale=st.sampled_from([None, 0.25]))
def test_equals_fla_naive_simple_gla_with_retention_gates(dtype, shape, chunk, scale):
    # Retention is simple GLA with g = log(1 - 2^(-5-h)); this oracle also covers the states.
    ref = fla_oracle.naive("simple_gla")
    q, k, v, s0 = make_inputs(**shape, dtype=dtype)
    b, t, h, _ = q.shape
    g = torch.tensor([math.log(1 - 2.0 ** (-5 - i)) for i in range(h)], dtype=dtype).expand(b, t, h)
    o_ref, s_ref = fla_oracle.call(ref.naive_chunk_simple_gla, q, k, v, g, initial_state=s0,
                                   output_final_state=True, chunk_size=chunk, scale=scale, dtype=dtype)
    o, s = retention(q, k, v, chunk_size=chunk, initial_state=s0, output_final_state=True, scale=scale)
    assert_close(o, o_ref.to(dtype), dtype)
    assert_close(s, s_ref.to(dtype), dtype)
