"""GLA and scalar-gated linear attention: recurrent == chunked (any T, chunk, split),
gradients, numerical stability under strong decay, and flash-linear-attention's naive
references as external oracles (fp32 and fp64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from hypothesis import given
from hypothesis import strategies as st

from seqzoo.ops.gla import gla, gla_chunked, gla_recurrent, simple_gla, simple_gla_chunked, simple_gla_recurrent
from tests.helpers import assert_close
from tests.ops import fla_oracle

DTYPES = [torch.float64, torch.float32]


def make_inputs(b: int, t: int, h: int, dk: int, dv: int, *, dtype: torch.dtype, seed: int,
                scalar_gate: bool = False, gate_scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v = rand(b, t, h, dk), rand(b, t, h, dk), rand(b, t, h, dv)
    g = F.logsigmoid(rand(b, t, h) if scalar_gate else rand(b, t, h, dk)) * gate_scale
    s0 = rand(b, h, dk, dv)
    return tuple(z.to(dtype) for z in (q, k, v, g, s0))


shapes = st.fixed_dictionaries({
    "b": st.integers(1, 2), "t": st.integers(1, 40), "h": st.integers(1, 3),
    "dk": st.integers(1, 6), "dv": st.integers(1, 5), "seed": st.integers(0, 2**16),
})


@pytest.mark.parametrize("intra", ["factored", "secondary"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(shape=shapes, chunk=st.integers(1, 24), sub=st.sampled_from([None, 1, 2, 4]), with_state=st.booleans())
def test_gla_chunked_equals_recurrent(intra, dtype, shape, chunk, sub, with_state):
    q, k, v, g, s0 = make_inputs(**shape, dtype=dtype)
    s0 = s0 if with_state else None
    o_ref, s_ref = gla_recurrent(q, k, v, g, initial_state=s0, output_final_state=True)
    o, s = gla_chunked(q, k, v, g, chunk_size=chunk, intra=intra, sub_chunk_size=sub, initial_state=s0,
                       output_final_state=True)
    assert_close(o, o_ref, dtype, f"{intra} chunk={chunk} sub={sub}")
    assert_close(s, s_ref, dtype, "final state")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(shape=shapes, chunk=st.integers(1, 24), with_state=st.booleans())
def test_simple_gla_chunked_equals_recurrent(dtype, shape, chunk, with_state):
    q, k, v, g, s0 = make_inputs(**shape, dtype=dtype, scalar_gate=True)
    s0 = s0 if with_state else None
    o_ref, s_ref = simple_gla_recurrent(q, k, v, g, initial_state=s0, output_final_state=True)
    o, s = simple_gla_chunked(q, k, v, g, chunk_size=chunk, initial_state=s0, output_final_state=True)
    assert_close(o, o_ref, dtype, f"chunk={chunk}")
    assert_close(s, s_ref, dtype, "final state")


@pytest.mark.parametrize("op", [gla, simple_gla], ids=["gla", "simple_gla"])
@given(shape=shapes, chunk=st.integers(1, 16), data=st.data())
def test_any_split_point(op, shape, chunk, data):
    q, k, v, g, _ = make_inputs(**shape, dtype=torch.float64, scalar_gate=op is simple_gla)
    cut = data.draw(st.integers(0, q.shape[1]), label="cut")
    o_full, s_full = op(q, k, v, g, chunk_size=chunk, output_final_state=True)
    o1, s1 = op(q[:, :cut], k[:, :cut], v[:, :cut], g[:, :cut], chunk_size=chunk, output_final_state=True)
    o2, s2 = op(q[:, cut:], k[:, cut:], v[:, cut:], g[:, cut:], chunk_size=chunk, initial_state=s1,
                output_final_state=True)
    assert_close(torch.cat([o1, o2], 1), o_full, torch.float64, f"cut={cut}")
    assert_close(s2, s_full, torch.float64)


def test_final_state_only_when_asked():
    q, k, v, g, _ = make_inputs(1, 5, 1, 2, 2, dtype=torch.float64, seed=0)
    assert gla(q, k, v, g)[1] is None and gla_recurrent(q, k, v, g)[1] is None


@pytest.mark.parametrize("form", ["gla-factored", "gla-secondary", "gla-secondary-cliff", "simple_gla"])
def test_gradients_chunked_equal_recurrent(form):
    scalar = form == "simple_gla"
    q, k, v, g, s0 = make_inputs(2, 29, 2, 4, 3, dtype=torch.float64, seed=3, scalar_gate=scalar)
    if form.endswith("cliff"):  # some diagonal blocks too steep to factor: the exact branch
        g = g.clone()
        g[:, 5:9, 1] *= 600.0
    inputs = [z.clone().requires_grad_() for z in (q, k, v, g, s0)]
    rec, chunked = (simple_gla_recurrent, simple_gla_chunked) if scalar else (gla_recurrent, gla_chunked)
    extra = {} if scalar else {"intra": form.split("-")[1], "sub_chunk_size": 4}

    def grads(fn, **kw):
        o, s = fn(*inputs[:4], initial_state=inputs[4], output_final_state=True, **kw)
        gen = torch.Generator().manual_seed(0)  # randn(shape), not randn_like: o may be strided
        loss = (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum()
        loss = loss + (s * torch.randn(s.shape, generator=gen, dtype=s.dtype)).sum()
        return torch.autograd.grad(loss, inputs)

    for name, a, b in zip("q k v g s0".split(), grads(chunked, chunk_size=16, **extra), grads(rec)):
        assert_close(a, b, torch.float64, f"d{name}")


def test_strong_decay_is_stable_in_fp32():
    # exp(-cumsum g) would reach exp(+60 * 64) here: "auto" must leave the factored form for
    # secondary chunking, which never forms it.
    q, k, v, g, s0 = make_inputs(1, 70, 2, 4, 3, dtype=torch.float32, seed=1, gate_scale=60.0)
    o_ref, s_ref = gla_recurrent(q, k, v, g, initial_state=s0, output_final_state=True)
    o, s = gla(q, k, v, g, chunk_size=64, initial_state=s0, output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert_close(o, o_ref, torch.float32)
    assert_close(s, s_ref, torch.float32)


@pytest.mark.parametrize("intra", ["auto", "secondary"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mixed_decay_uses_exact_blocks_only_where_needed(intra, dtype):
    # Gates that fall off a cliff in a few sub-chunks only: safe and unsafe diagonal blocks
    # in the same call (the fp64 limit is wider, hence the larger cliff there).
    q, k, v, g, s0 = make_inputs(2, 90, 2, 4, 3, dtype=dtype, seed=4)
    cliff = 60.0 if dtype == torch.float32 else 600.0
    g = g.clone()
    g[0, 20:30, 0] *= cliff
    g[1, 50:52, 1, :2] *= cliff
    o_ref, s_ref = gla_recurrent(q, k, v, g, initial_state=s0, output_final_state=True)
    o, s = gla_chunked(q, k, v, g, chunk_size=32, intra=intra, initial_state=s0, output_final_state=True)
    assert torch.isfinite(o).all()
    assert_close(o, o_ref, dtype)
    assert_close(s, s_ref, dtype)


def test_half_precision_is_computed_in_fp32():
    q, k, v, g, _ = make_inputs(1, 33, 2, 8, 8, dtype=torch.float64, seed=2)
    o_ref, _ = gla(q, k, v, g, chunk_size=16)
    o, _ = gla(*(z.bfloat16() for z in (q, k, v, g)), chunk_size=16)
    assert o.dtype == torch.bfloat16
    rel = (o.double() - o_ref).norm() / o_ref.norm()
    assert rel < 2e-2, rel


# -- external oracles ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(shape=shapes, chunk=st.sampled_from([1, 5, 16, 64]), with_state=st.booleans())
def test_gla_equals_fla_naive_recurrent(dtype, shape, chunk, with_state):
    ref = fla_oracle.naive("gla")
    q, k, v, g, s0 = make_inputs(**shape, dtype=dtype)
    s0 = s0 if with_state else None
    o_ref, s_ref = fla_oracle.call(ref.naive_recurrent_gla, q, k, v, g, initial_state=s0,
                                   output_final_state=True, dtype=dtype)
    o, s = gla(q, k, v, g, chunk_size=chunk, initial_state=s0, output_final_state=True)
    assert_close(o, o_ref, dtype)
    assert_close(s, s_ref.to(dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(shape=shapes, chunk=st.sampled_from([1, 4, 16, 64]), with_state=st.booleans(),
       scale=st.sampled_from([None, 0.3]))
def test_simple_gla_equals_fla_naive(dtype, shape, chunk, with_state, scale):
    ref = fla_oracle.naive("simple_gla")
    q, k, v, g, s0 = make_inputs(**shape, dtype=dtype, scalar_gate=True)
    s0 = s0 if with_state else None
    o, s = simple_gla(q, k, v, g, chunk_size=chunk, initial_state=s0, output_final_state=True, scale=scale)
    o_rec, s_rec = fla_oracle.call(ref.naive_recurrent_simple_gla, q, k, v, g, scale=scale, initial_state=s0,
                                   output_final_state=True, dtype=dtype)
    assert_close(o, o_rec, dtype, "vs naive_recurrent_simple_gla")
    assert_close(s, s_rec.to(dtype), dtype, "final state vs naive_recurrent_simple_gla")
    o_chk, s_chk = fla_oracle.call(ref.naive_chunk_simple_gla, q, k, v, g, initial_state=s0,
                                   output_final_state=True, chunk_size=chunk, scale=scale, dtype=dtype)
    assert_close(o, o_chk.to(dtype), dtype, "vs naive_chunk_simple_gla")
    assert_close(s, s_chk.to(dtype), dtype, "final state vs naive_chunk_simple_gla")
    if s0 is None:
        o_par, _ = fla_oracle.call(ref.naive_parallel_simple_gla, q, k, v, g, scale=scale, dtype=dtype)
        assert_close(o, o_par.to(dtype), dtype, "vs naive_parallel_simple_gla")


def test_fp64_oracle_really_runs_in_fp64():
    ref = fla_oracle.naive("gla")
    q, k, v, g, _ = make_inputs(1, 9, 1, 3, 2, dtype=torch.float64, seed=5)
    o64, _ = fla_oracle.call(ref.naive_recurrent_gla, q, k, v, g, dtype=torch.float64)
    o32, _ = ref.naive_recurrent_gla(q, k, v, g)  # casts to fp32 inside, returns fp64
    assert (o64 - o32).abs().max() > 0  # the promotion changed the arithmetic
    o, _ = gla_recurrent(q, k, v, g)
    assert (o64 - o).abs().max() < 1e-12


def test_layout_mismatch_is_an_error():
    q, k, v, g, _ = make_inputs(1, 4, 2, 3, 3, dtype=torch.float64, seed=0)
    with pytest.raises(ValueError, match="g of shape"):
        gla(q, k, v, g[..., 0])
    with pytest.raises(ValueError, match="g of shape"):
        simple_gla(q, k, v, g)
    with pytest.raises(ValueError):
        gla(rearrange(q, "b t h k -> b h t k"), k, v, g)
