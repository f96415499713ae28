"""SSD (Mamba2's core): chunked == sequential (values, states, gradients), any split point,
the stable segment sum, and flash-linear-attention's simple-GLA naive recurrence as an
external oracle (SSD is scalar-gated linear attention: q = C, k = B, v = dt·x, g = dt·A)."""

from __future__ import annotations

import math

import pytest
import torch
from einops import rearrange, repeat
from hypothesis import given
from hypothesis import strategies as st

from seqzoo.ops.ssd import segprod, segsum, ssd, ssd_sequential, ssd_step
from tests.helpers import assert_close
from tests.ops import fla_oracle

DTYPES = [torch.float64, torch.float32]


def make_inputs(*, b: int, t: int, h: int, g: int, p: int, n: int, dtype: torch.dtype, seed: int,
                d_mode: str = "head", with_state: bool = True) -> dict:
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    inputs = dict(
        x=rnd(b, t, h, p),
        # dt as Mamba2 produces it: softplus of a pre-activation, so strictly positive
        dt=torch.nn.functional.softplus(rnd(b, t, h) - 1.0),
        A=-torch.exp(rnd(h) * 0.5),
        B=rnd(b, t, g, n),
        C=rnd(b, t, g, n),
        D={"none": None, "head": rnd(h), "channel": rnd(h, p)}[d_mode],
        initial_state=rnd(b, h, p, n) if with_state else None,
    )
    return {k: (v.to(dtype) if v is not None else None) for k, v in inputs.items()}


@st.composite
def problems(draw, max_t: int = 24):
    g = draw(st.sampled_from([1, 2]), label="G")
    return dict(
        b=draw(st.integers(1, 2), label="B"),
        t=draw(st.integers(1, max_t), label="T"),
        h=g * draw(st.sampled_from([1, 2]), label="H/G"),
        g=g,
        p=draw(st.sampled_from([1, 3]), label="P"),
        n=draw(st.sampled_from([2, 4]), label="N"),
        seed=draw(st.integers(0, 2**16), label="seed"),
        d_mode=draw(st.sampled_from(["none", "head", "channel"]), label="D"),
        with_state=draw(st.booleans(), label="initial_state"),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(prob=problems(), chunk=st.sampled_from([1, 2, 5, 8, 32]))
def test_chunked_equals_sequential(dtype, prob, chunk):
    args = make_inputs(**prob, dtype=dtype)
    y_ref, s_ref = ssd_sequential(**args, output_final_state=True)
    y, s = ssd(**args, chunk_size=chunk, output_final_state=True)
    assert y.dtype == dtype and s.dtype == dtype
    assert_close(y, y_ref, dtype, f"y, chunk={chunk}")
    assert_close(s, s_ref, dtype, f"final state, chunk={chunk}")


@given(prob=problems(), chunk=st.sampled_from([1, 3, 8]), data=st.data())
def test_split_point_with_carried_state(prob, chunk, data):
    prob["t"] = max(prob["t"], 2)
    args = make_inputs(**prob, dtype=torch.float64)
    cut = data.draw(st.integers(1, prob["t"] - 1), label="cut")
    y_full, s_full = ssd(**args, chunk_size=chunk, output_final_state=True)
    first = {k: (v[:, :cut] if k in ("x", "dt", "B", "C") else v) for k, v in args.items()}
    second = {k: (v[:, cut:] if k in ("x", "dt", "B", "C") else v) for k, v in args.items()}
    y1, s1 = ssd(**first, chunk_size=chunk, output_final_state=True)
    y2, s2 = ssd(**{**second, "initial_state": s1}, chunk_size=chunk, output_final_state=True)
    assert_close(torch.cat([y1, y2], 1), y_full, torch.float64, f"cut={cut}")
    assert_close(s2, s_full, torch.float64, "final state after two calls")


@given(prob=problems(max_t=12), chunk=st.sampled_from([1, 4, 5]))
def test_gradients_chunked_equal_sequential(prob, chunk):
    prob["with_state"] = True
    args = make_inputs(**prob, dtype=torch.float64)
    leaves = {k: v.clone().requires_grad_() for k, v in args.items() if v is not None}
    gen = torch.Generator().manual_seed(prob["seed"] + 1)
    w_y = torch.randn(args["x"].shape, generator=gen, dtype=torch.float64)
    w_s = torch.randn(args["initial_state"].shape, generator=gen, dtype=torch.float64)

    def grads(fn, **kw):
        y, s = fn(**{**args, **leaves}, output_final_state=True, **kw)
        return torch.autograd.grad((y * w_y).sum() + (s * w_s).sum(), list(leaves.values()))

    for name, ga, gb in zip(leaves, grads(ssd, chunk_size=chunk), grads(ssd_sequential)):
        assert torch.isfinite(ga).all(), name
        assert_close(ga, gb, torch.float64, f"d/d{name}, chunk={chunk}")


def test_padding_does_not_touch_the_final_state():
    """T not a multiple of the chunk: the padded tail must neither decay nor write."""
    args = make_inputs(b=1, t=7, h=2, g=1, p=2, n=3, dtype=torch.float64, seed=3)
    _, s_seq = ssd_sequential(**args, output_final_state=True)
    _, s_pad = ssd(**args, chunk_size=16, output_final_state=True)
    assert_close(s_pad, s_seq, torch.float64)
    assert ssd(**args, chunk_size=16)[1] is None


def test_empty_sequence_passes_the_state_through():
    args = make_inputs(b=2, t=0, h=2, g=1, p=2, n=3, dtype=torch.float64, seed=9)
    for fn, kw in ((ssd, dict(chunk_size=4)), (ssd_sequential, {})):
        y, s = fn(**args, **kw, output_final_state=True)
        assert y.shape == (2, 0, 2, 2) and torch.equal(s, args["initial_state"])


def test_step_does_not_mutate_its_state():
    args = make_inputs(b=2, t=1, h=2, g=2, p=2, n=3, dtype=torch.float64, seed=4)
    state = args["initial_state"]
    before = state.clone()
    _, new = ssd_step(args["x"][:, 0], args["dt"][:, 0], args["A"], args["B"][:, 0], args["C"][:, 0],
                      state, D=args["D"])
    assert torch.equal(state, before) and not torch.equal(new, before)


def test_segsum_matches_explicit_sums_and_is_stable():
    a = torch.tensor([-3.0, -1.0, -0.5, -2.0], dtype=torch.float64)
    out = segsum(a)
    for t in range(4):
        for s in range(4):
            expected = a[s + 1:t + 1].sum() if s <= t else float("-inf")
            assert out[t, s] == expected, (t, s)
    # A huge first decay: prefix-sum differences would lose the -1 steps in fp32 entirely.
    big = torch.tensor([-1e8, -1.0, -1.0, -1.0], dtype=torch.float32)
    assert segsum(big)[3, 1].item() == -2.0
    assert (big.cumsum(0)[3] - big.cumsum(0)[1]).item() != -2.0  # the naive form fails here


def test_fp32_stays_accurate_after_a_huge_decay_inside_a_chunk():
    """One enormous dt early in a chunk makes the in-chunk prefix sums of dt·A huge; decays
    computed as differences of those sums would lose fp32 precision (the segsum concern)."""
    args = make_inputs(b=1, t=16, h=2, g=1, p=2, n=3, dtype=torch.float64, seed=8, with_state=False)
    args["dt"][:, 1] = 1e5
    y_ref, s_ref = ssd_sequential(**args, output_final_state=True)
    y, s = ssd(**{k: (v.float() if v is not None else None) for k, v in args.items()}, chunk_size=16,
               output_final_state=True)
    assert_close(y, y_ref.float(), torch.float32)
    assert_close(s, s_ref.float(), torch.float32)


def test_long_sequence_strong_decay_is_finite_with_gradients():
    args = make_inputs(b=1, t=600, h=2, g=1, p=2, n=4, dtype=torch.float32, seed=5)
    args["dt"] = args["dt"] * 20  # exp(dt·A) underflows over a chunk; must stay finite
    leaves = {k: v.clone().requires_grad_() for k, v in args.items() if v is not None}
    y, s = ssd(**{**args, **leaves}, chunk_size=64, output_final_state=True)
    (y.sum() + s.sum()).backward()
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    assert all(torch.isfinite(v.grad).all() for v in leaves.values())


def test_half_precision_is_computed_in_fp32():
    args = make_inputs(b=1, t=40, h=2, g=1, p=4, n=4, dtype=torch.float32, seed=6)
    y32, _ = ssd(**args, chunk_size=16)
    y16, s16 = ssd(**{k: (v.bfloat16() if v is not None else None) for k, v in args.items()},
                   chunk_size=16, output_final_state=True)
    assert y16.dtype == torch.bfloat16 and s16.dtype == torch.bfloat16
    rel = (y16.float() - y32).norm() / y32.norm()
    assert rel < 2e-2, rel  # bf16: judged on the whole tensor (inputs were rounded to bf16)


def test_bad_shapes_are_rejected_with_a_clear_error():
    args = make_inputs(b=1, t=4, h=3, g=2, p=2, n=3, dtype=torch.float64, seed=7)
    with pytest.raises(ValueError, match="multiple of the groups"):
        ssd(**args, chunk_size=2)
    args = make_inputs(b=1, t=4, h=2, g=1, p=2, n=3, dtype=torch.float64, seed=7)
    with pytest.raises(ValueError, match="dt"):
        ssd(**{**args, "dt": args["dt"][:, :3]}, chunk_size=2)
    with pytest.raises(ValueError, match="chunk_size"):
        ssd(**args, chunk_size=0)


# -- external oracle --------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(prob=problems(), chunk=st.sampled_from([1, 4, 16]))
def test_matches_fla_naive_recurrent_simple_gla(dtype, prob, chunk):
    naive = fla_oracle.naive("simple_gla")
    prob["d_mode"] = "none"  # the D skip is outside linear attention; checked by the tests above
    args = make_inputs(**prob, dtype=dtype)
    x, dt, A, B, C, s0 = (args[k] for k in ("x", "dt", "A", "B", "C", "initial_state"))
    r = prob["h"] // prob["g"]
    # mamba-ssm's group convention: head h reads group h // (H/G).
    q = repeat(C, "b t g n -> b t (g r) n", r=r)  # (B, T, H, N)
    k = repeat(B, "b t g n -> b t (g r) n", r=r)  # (B, T, H, N)
    v = x * dt[..., None]  # (B, T, H, P)
    fla_s0 = rearrange(s0, "b h p n -> b h n p") if s0 is not None else None  # fla keeps (K, V)
    o, s_fla = fla_oracle.call(naive.naive_recurrent_simple_gla, q, k, v, dt * A, scale=1.0,
                               initial_state=fla_s0, output_final_state=True, dtype=dtype)
    assert o.dtype == dtype and s_fla.dtype == dtype  # the oracle really ran at this precision
    y, s = ssd(**args, chunk_size=chunk, output_final_state=True)
    assert_close(y, o, dtype, "y vs fla naive_recurrent_simple_gla")
    assert_close(s, rearrange(s_fla, "b h n p -> b h p n"), dtype, "final state vs fla")


# -- negative eigenvalues (Grazzi et al. 2024): transition 2·exp(dt A) − 1 ------------------
def neg_loop(x, dt, A, B, C, D=None, initial_state=None):
    """The recurrence written out per head and token, a_t = 2·exp(dt_t A_h) − 1."""
    b, t, h, p = x.shape
    n, r = B.shape[-1], h // B.shape[2]
    state = initial_state.clone() if initial_state is not None else x.new_zeros(b, h, p, n)
    y = torch.zeros_like(x)
    for i in range(t):
        for k in range(h):
            a = 2 * torch.exp(dt[:, i, k] * A[k]) - 1  # (B,)
            state[:, k] = a[:, None, None] * state[:, k] + dt[:, i, k, None, None] * x[:, i, k, :, None] \
                * B[:, i, k // r, None, :]
            y[:, i, k] = (state[:, k] * C[:, i, k // r, None, :]).sum(-1)
            if D is not None:
                y[:, i, k] += D[k] * x[:, i, k]  # D: (H,) or (H, P)
    return y, state


def neg_inputs(prob: dict) -> dict:
    """Large steps (many negative transitions) and head 0 at dt = log 2, A = −1, whose
    transition 2·exp(−log 2) − 1 is exactly 0 (checked) at every other token."""
    args = make_inputs(**prob, dtype=torch.float64)
    args["dt"] = args["dt"] * 4
    args["A"] = args["A"].clone()
    args["A"][0] = -1.0
    args["dt"][:, ::2, 0] = math.log(2)
    assert torch.equal(2 * torch.exp(args["dt"][:, ::2, 0] * args["A"][0]) - 1, torch.zeros_like(args["dt"][:, ::2, 0]))
    return args


@given(prob=problems(), chunk=st.sampled_from([1, 2, 5, 8, 32]))
def test_neg_eigval_chunked_equals_sequential_equals_the_loop(prob, chunk):
    args = neg_inputs(prob)
    y_ref, s_ref = neg_loop(**args)
    y_seq, s_seq = ssd_sequential(**args, output_final_state=True, allow_neg_eigval=True)
    y, s = ssd(**args, chunk_size=chunk, output_final_state=True, allow_neg_eigval=True)
    assert_close(y_seq, y_ref, torch.float64, "sequential vs loop")
    assert_close(s_seq, s_ref, torch.float64, "sequential final state")
    assert_close(y, y_ref, torch.float64, f"chunked(C={chunk}) vs loop")
    assert_close(s, s_ref, torch.float64, f"chunked(C={chunk}) final state")


@given(prob=problems(), chunk=st.sampled_from([1, 3, 8]), data=st.data())
def test_neg_eigval_split_point_with_carried_state(prob, chunk, data):
    prob["t"] = max(prob["t"], 2)
    args = neg_inputs(prob)
    cut = data.draw(st.integers(1, prob["t"] - 1), label="cut")
    kw = dict(chunk_size=chunk, output_final_state=True, allow_neg_eigval=True)
    y_full, s_full = ssd(**args, **kw)
    first = {k: (v[:, :cut] if k in ("x", "dt", "B", "C") else v) for k, v in args.items()}
    second = {k: (v[:, cut:] if k in ("x", "dt", "B", "C") else v) for k, v in args.items()}
    y1, s1 = ssd(**first, **kw)
    y2, s2 = ssd(**{**second, "initial_state": s1}, **kw)
    assert_close(torch.cat([y1, y2], 1), y_full, torch.float64, f"cut={cut}")
    assert_close(s2, s_full, torch.float64, "final state after two calls")


@given(prob=problems(max_t=12), chunk=st.sampled_from([1, 4, 5]))
def test_neg_eigval_gradients_chunked_equal_sequential(prob, chunk):
    prob["with_state"] = True
    args = neg_inputs(prob)
    leaves = {k: v.clone().requires_grad_() for k, v in args.items() if v is not None}
    gen = torch.Generator().manual_seed(prob["seed"] + 1)
    w_y = torch.randn(args["x"].shape, generator=gen, dtype=torch.float64)
    w_s = torch.randn(args["initial_state"].shape, generator=gen, dtype=torch.float64)

    def grads(fn, **kw):
        y, s = fn(**{**args, **leaves}, output_final_state=True, allow_neg_eigval=True, **kw)
        return torch.autograd.grad((y * w_y).sum() + (s * w_s).sum(), list(leaves.values()))

    for name, ga, gb in zip(leaves, grads(ssd, chunk_size=chunk), grads(ssd_sequential)):
        assert torch.isfinite(ga).all(), name
        assert_close(ga, gb, torch.float64, f"d/d{name}, chunk={chunk}")


def test_neg_eigval_gradcheck_through_zero_transitions():
    args = neg_inputs(dict(b=1, t=7, h=2, g=1, p=2, n=2, seed=5, d_mode="head", with_state=True))
    names = list(args)
    leaves = [args[k].requires_grad_() for k in names]

    def f(*tensors):
        return ssd(**dict(zip(names, tensors)), chunk_size=3, output_final_state=True, allow_neg_eigval=True)

    assert torch.autograd.gradcheck(f, leaves)


def test_neg_eigval_transition_flips_the_state_and_can_be_zero():
    """x = 0: h_1 = (2·exp(dt A) − 1) h_0, exactly 0 at dt = log 2, A = −1, and of the
    opposite sign for a large step (an eigenvalue near −1); exp(dt A) h_0 keeps the sign."""
    A = torch.tensor([-1.0, -1.0], dtype=torch.float64)
    dt = torch.tensor([[[math.log(2), 5.0]]], dtype=torch.float64)  # (B, T=1, H=2)
    x, Bc = torch.zeros(1, 1, 2, 1, dtype=torch.float64), torch.ones(1, 1, 1, 1, dtype=torch.float64)
    h0 = torch.tensor([2.0, -3.0], dtype=torch.float64).reshape(1, 2, 1, 1)
    for fn in (ssd_sequential, lambda *a, **k: ssd(*a, chunk_size=4, **k)):
        _, h = fn(x, dt, A, Bc, Bc, initial_state=h0, output_final_state=True, allow_neg_eigval=True)
        assert h[0, 0].item() == 0.0
        assert h[0, 1].item() == (2 * math.exp(-5.0) - 1) * -3.0 > 0
        _, h = fn(x, dt, A, Bc, Bc, initial_state=h0, output_final_state=True)
        assert h[0, 1].item() < 0


def test_segprod_matches_explicit_products_with_signs_and_zeros():
    a = torch.tensor([0.5, -0.9, 0.0, -1.0, 0.3], dtype=torch.float64)
    out = segprod(a)
    for t in range(5):
        for s in range(5):
            expected = math.prod(a[s + 1:t + 1].tolist()) if s <= t else 0.0
            assert out[t, s].item() == expected, (t, s)
