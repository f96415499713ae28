"""Mamba's selective scan: both forms against a per-step loop written here from the paper's
equations (Gu & Dao 2023, eq. 2 and 4, Algorithm 2), chunked == sequential (values, final
state and gradients, also over long sequences of many chunks), chaining at any split,
numerical stability of long strongly-decaying chunks and of decays of either sign, the
chunked form's machinery (chunk boundaries within the decay budget, the blocked cumulative
sum), and mamba-ssm's layouts (shared, grouped and time-invariant B / C)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from seqzoo.ops.selective_scan import (
    default_chunk_size,
    selective_scan,
    selective_scan_chunked,
    selective_scan_sequential,
)
from seqzoo.ops.selective_scan_chunked import _MAX_EXPONENT, _BlockedCumsum, _chunk_bounds
from tests.helpers import assert_close


def paper_loop(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
               initial_state=None, neg_eigval=False):
    """Algorithm 2 token by token and channel group by channel group, nothing vectorised
    over time: Ā_t = exp(Δ_t A), B̄_t = Δ_t B_t (Mamba's simplified ZOH),
    h_t = Ā_t h_{t-1} + B̄_t x_t, y_t = C_t h_t (+ D x_t), then y ⊙ SiLU(z).
    ``neg_eigval``: Ā_t = 2 exp(Δ_t A) - 1 (Grazzi et al. 2024), B̄_t unchanged."""
    batch, dim, length = u.shape
    n = A.shape[1]
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = torch.log1p(torch.exp(delta))  # softplus, written out

    def per_channel(M, t):  # -> (batch, dim, n): the B_t or C_t each channel d sees
        if M.dim() == 2:  # (D, N), time-invariant
            return M.expand(batch, dim, n)
        if M.dim() == 3:  # (B, N, T), one for all channels
            return M[:, None, :, t].expand(batch, dim, n)
        groups = M.shape[1]  # (B, G, N, T): channel d belongs to group d // (D / G)
        owner = torch.arange(dim) // (dim // groups)
        return M[:, owner, :, t]

    h = torch.zeros(batch, dim, n, dtype=u.dtype) if initial_state is None else initial_state.clone()
    ys = []
    for t in range(length):
        A_bar = torch.exp(delta[:, :, t, None] * A[None])  # (B, D, N)
        if neg_eigval:
            A_bar = 2 * A_bar - 1
        B_bar = delta[:, :, t, None] * per_channel(B, t)  # (B, D, N)
        h = A_bar * h + B_bar * u[:, :, t, None]
        y = (per_channel(C, t) * h).sum(-1)  # (B, D)
        if D is not None:
            y = y + D * u[:, :, t]
        ys.append(y)
    y = torch.stack(ys, -1) if ys else u[..., :0]
    if z is not None:
        y = y * z * torch.sigmoid(z)
    return y, h


@st.composite
def problems(draw, dtype=torch.float64, max_t=24):
    """A random selective-scan problem in mamba-ssm's layouts."""
    batch = draw(st.integers(1, 2), label="B")
    dim = draw(st.sampled_from([1, 2, 4, 6]), label="D")
    n = draw(st.integers(1, 5), label="N")
    length = draw(st.integers(1, max_t), label="T")
    seed = draw(st.integers(0, 2**16), label="seed")
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64).mul(scale).to(dtype)

    def bc(label):
        divisors = [k for k in range(1, dim + 1) if dim % k == 0]
        kind = draw(st.sampled_from(["shared", "grouped", "static"]), label=label)
        if kind == "shared":
            return rnd(batch, n, length)
        if kind == "static":
            return rnd(dim, n)
        return rnd(batch, draw(st.sampled_from(divisors), label=f"{label}_groups"), n, length)

    kw = dict(
        u=rnd(batch, dim, length), delta=rnd(batch, dim, length, scale=0.5),
        A=-torch.rand(dim, n, generator=g, dtype=torch.float64).mul(4).to(dtype), B=bc("B"), C=bc("C"),
    )
    if draw(st.booleans(), label="D"):
        kw["D"] = rnd(dim)
    if draw(st.booleans(), label="z"):
        kw["z"] = rnd(batch, dim, length)
    if draw(st.booleans(), label="delta_bias"):
        kw["delta_bias"] = rnd(dim)
    kw["delta_softplus"] = draw(st.booleans(), label="softplus")
    if not kw["delta_softplus"]:
        kw["delta"] = kw["delta"].abs()  # Δ > 0 as after the softplus
        kw.pop("delta_bias", None)
    if draw(st.booleans(), label="initial_state"):
        kw["initial_state"] = rnd(batch, dim, n)
    return kw


@given(kw=problems(), chunk=st.integers(1, 9), data=st.data())
def test_both_forms_equal_the_paper_loop(kw, chunk, data):
    y_ref, h_ref = paper_loop(**kw)
    y_seq, h_seq = selective_scan_sequential(**kw, return_final_state=True)
    y_chk, h_chk = selective_scan_chunked(**kw, return_final_state=True, chunk_size=chunk)
    assert_close(y_seq, y_ref, msg="sequential vs paper loop")
    assert_close(h_seq, h_ref, msg="sequential final state")
    assert_close(y_chk, y_ref, msg=f"chunked(C={chunk}) vs paper loop")
    assert_close(h_chk, h_ref, msg=f"chunked(C={chunk}) final state")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@given(data=st.data())
def test_chunked_equals_sequential(dtype, data):
    kw = data.draw(problems(dtype=dtype, max_t=40), label="problem")
    chunk = data.draw(st.sampled_from([None, 1, 2, 5, 16, 64]), label="chunk")
    y_seq, h_seq = selective_scan(**kw, return_final_state=True, method="sequential")
    y_chk, h_chk = selective_scan(**kw, return_final_state=True, method="chunked", chunk_size=chunk)
    assert y_chk.dtype == dtype and h_chk.dtype == dtype
    assert_close(y_chk, y_seq, dtype, f"chunk={chunk}")
    assert_close(h_chk, h_seq, dtype, f"chunk={chunk}: final state")
    with torch.no_grad():  # recomputes the decays in its second pass instead of keeping them
        y_ng, h_ng = selective_scan(**kw, return_final_state=True, method="chunked", chunk_size=chunk)
    assert_close(y_ng, y_seq, dtype, f"no_grad chunk={chunk}")
    assert_close(h_ng, h_seq, dtype, f"no_grad chunk={chunk}: final state")
    y_auto, h_auto = selective_scan(**kw, return_final_state=True)  # method="auto"
    assert_close(y_auto, y_seq, dtype, "auto")
    assert_close(h_auto, h_seq, dtype, "auto: final state")


@given(length=st.integers(1, 10_000), step_elements=st.integers(1, 2**22))
def test_default_chunk_size(length, step_elements):
    """Chunks of 8 to 127 tokens, shorter for larger states (their blocks must stay near
    the cache), 8k - 1 from 15 up (whole blocks of 8 rows with the start state)."""
    size = default_chunk_size(length, step_elements)
    assert 1 <= size <= length
    if size < length:
        assert 8 <= size <= 127
        assert size < 16 or (size + 1) % 8 == 0
        assert size * step_elements <= 2**19 or size == 8
    if length <= 8:
        assert size == length
    if 2**19 // step_elements >= 127 and length >= 127:
        assert size == 127  # small states: the longest chunks
    assert default_chunk_size(length, 2 * step_elements) <= size  # monotone in the state size


@given(rate=st.lists(st.floats(0, 200), min_size=1, max_size=300), max_len=st.integers(1, 70),
       max_exponent=st.sampled_from([1.0, 60.0, 300.0]))
def test_chunk_bounds_respect_the_decay_budget(rate, max_len, max_exponent):
    """Chunks tile [0, T), hold at most max_len tokens, and keep Σ r_t within 2·max_exponent
    unless they are a single token (which the chunked form scans as a plain step)."""
    bounds = _chunk_bounds(torch.tensor(rate, dtype=torch.float64), max_len, max_exponent)
    assert bounds[0] == 0 and bounds[-1] == len(rate)
    for start, end in zip(bounds[:-1], bounds[1:]):
        assert 1 <= end - start <= max_len
        if end - start > 1:
            assert sum(rate[start:end]) <= 2 * max_exponent * (1 + 1e-12)
        if end < len(rate) and end - start < max_len:
            # a chunk stops early only at the budget, or at a whole number of 8-row blocks
            over = sum(rate[start:end + 1]) > 2 * max_exponent * (1 - 1e-12)
            assert over or (end - start + 1) % 8 == 0


@given(length=st.integers(1, 80), reverse=st.booleans(), seed=st.integers(0, 2**16))
def test_blocked_cumsum_equals_torch_cumsum(length, reverse, seed):
    x = torch.randn(2, length, 3, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    expected = x.flip(1).cumsum(1).flip(1) if reverse else x.cumsum(1)
    _BlockedCumsum(x, reverse)()
    assert_close(x, expected)


@given(kw=problems(max_t=20), data=st.data())
def test_chaining_at_any_split(kw, data):
    length = kw["u"].shape[-1]
    cut = data.draw(st.integers(0, length), label="cut")
    chunk = data.draw(st.integers(1, 6), label="chunk")
    y_full, h_full = selective_scan_chunked(**kw, return_final_state=True, chunk_size=chunk)

    def part(lo, hi, state):
        sliced = {k: (v[..., lo:hi] if k in ("u", "delta", "z") or (k in ("B", "C") and v.dim() > 2) else v)
                  for k, v in kw.items() if k != "initial_state"}
        return selective_scan_chunked(**sliced, initial_state=state, return_final_state=True, chunk_size=chunk)

    y1, h1 = part(0, cut, kw.get("initial_state"))
    y2, h2 = part(cut, length, h1)
    assert_close(torch.cat([y1, y2], -1), y_full, msg=f"cut={cut}")
    assert_close(h2, h_full, msg=f"cut={cut}: final state")


@given(kw=problems(max_t=14), chunk=st.integers(1, 5))
def test_gradients_chunked_equal_sequential(kw, chunk):
    def grads(fn, **extra):
        leaves = {k: v.detach().clone().requires_grad_() if torch.is_tensor(v) else v for k, v in kw.items()}
        y, h = fn(**leaves, return_final_state=True, **extra)
        g = torch.Generator().manual_seed(1)
        loss = ((y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum()
                + (h * torch.randn(h.shape, generator=g, dtype=h.dtype)).sum())
        loss.backward()
        return {k: v.grad for k, v in leaves.items() if torch.is_tensor(v)}

    g_seq = grads(selective_scan_sequential)
    g_chk = grads(selective_scan_chunked, chunk_size=chunk)
    for name, expected in g_seq.items():
        assert expected is not None and torch.isfinite(expected).all(), name
        assert_close(g_chk[name], expected, msg=f"d loss / d {name}")


def test_long_strongly_decaying_chunks_are_stable():
    """Large Δ·A (total in-chunk log decay far below -1e3) must neither overflow nor lose
    the recent inputs: every exponent the chunked form takes is <= 0."""
    g = torch.Generator().manual_seed(0)
    b, d, n, t = 2, 3, 16, 300
    u = torch.randn(b, d, t, generator=g)
    delta = torch.rand(b, d, t, generator=g) * 20 + 0.5  # Δ up to ~20, log decay down to -320 per step
    A = -torch.arange(1, n + 1, dtype=torch.float32).expand(d, n).contiguous()
    B, C = torch.randn(b, n, t, generator=g), torch.randn(b, n, t, generator=g)
    leaves = [x.requires_grad_() for x in (u, delta, A, B, C)]
    y_chk, h_chk = selective_scan_chunked(*leaves, return_final_state=True, chunk_size=150)
    assert torch.isfinite(y_chk).all() and torch.isfinite(h_chk).all()
    y_chk.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in leaves)
    with torch.no_grad():
        y_seq, h_seq = selective_scan_sequential(u, delta, A, B, C, return_final_state=True)
        # With near-total forgetting, h_t ≈ Δ_t B_t u_t: the answer is O(1), not 0.
        assert y_seq.abs().max() > 1
    assert_close(y_chk.detach(), y_seq, torch.float32)
    assert_close(h_chk.detach(), h_seq, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_long_sequences_of_many_chunks(dtype):
    """A Mamba layer's inputs (Δ from softplus around the paper's dt range, A = -(1..N)) over
    T = 1500: chunks cut by the decay budget and by their maximum length, fp64 Γ keeping
    Γ_t - Γ_ref exact however far into the sequence; values, final state and gradients."""
    g = torch.Generator().manual_seed(0)
    b, d, n, t = 2, 6, 16, 1500
    log_dt = torch.rand(d, generator=g, dtype=torch.float64) * (math.log(0.2) - math.log(1e-3)) + math.log(1e-3)
    dt = log_dt.exp()  # dt in [1e-3, 0.2], log-uniform (Mamba's init, a little wider)
    kw = dict(u=torch.randn(b, d, t, generator=g, dtype=torch.float64),
              delta=torch.randn(b, d, t, generator=g, dtype=torch.float64) * 0.5,
              A=-torch.arange(1, n + 1, dtype=torch.float64).expand(d, n).contiguous(),
              B=torch.randn(b, n, t, generator=g, dtype=torch.float64),
              C=torch.randn(b, n, t, generator=g, dtype=torch.float64),
              D=torch.randn(d, generator=g, dtype=torch.float64),
              z=torch.randn(b, d, t, generator=g, dtype=torch.float64),
              delta_bias=dt + torch.log(-torch.expm1(-dt)),  # inverse softplus
              initial_state=torch.randn(b, d, n, generator=g, dtype=torch.float64))
    kw = {k: v.to(dtype) for k, v in kw.items()}
    delta = F.softplus(kw["delta"] + kw["delta_bias"][:, None])
    rate = (delta * kw["A"].abs().amax(1)[:, None]).amax((0, 1))
    bounds = _chunk_bounds(rate, default_chunk_size(t, b * d * n), _MAX_EXPONENT[dtype])
    assert len(bounds) > 10  # many chunks
    if dtype == torch.float32:  # some cut short by the decay budget (fp64's is 5x wider)
        assert any(e - s < default_chunk_size(t, b * d * n) for s, e in zip(bounds[:-2], bounds[1:-1]))

    def run(fn):
        leaves = {k: v.clone().requires_grad_() for k, v in kw.items()}
        y, h = fn(**leaves, delta_softplus=True, return_final_state=True)
        w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
        ((y * w).sum() + h.sum()).backward()
        return y.detach(), h.detach(), {k: v.grad for k, v in leaves.items()}

    y_seq, h_seq, g_seq = run(selective_scan_sequential)
    y_chk, h_chk, g_chk = run(selective_scan_chunked)
    assert_close(y_chk, y_seq, dtype, "y")
    assert_close(h_chk, h_seq, dtype, "final state")
    for name, expected in g_seq.items():
        # fp32 gradients summed over 1500 steps carry the sequential loop's own rounding
        scale = 1.0 if dtype == torch.float64 else expected.abs().max().clamp(min=1).item()
        assert_close(g_chk[name] / scale, expected / scale, dtype, f"d loss / d {name}")


@given(kw=problems(max_t=30), chunk=st.integers(1, 12))
def test_time_major_inputs(kw, chunk):
    """Inputs stored time-major, as the Mamba mixer passes them ((B, D, T) views of
    (B, T, D) tensors): same values and gradients, outputs and gradients in that layout."""
    def time_major(k, v):
        if k in ("u", "delta", "z") or (k in ("B", "C") and v.dim() > 2):
            return v.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, stored (.., T, D)
        return v

    def run(inputs):
        leaves = {k: v.clone().requires_grad_() if torch.is_tensor(v) else v for k, v in inputs.items()}
        y, h = selective_scan_chunked(**leaves, return_final_state=True, chunk_size=chunk)
        ((y * y).sum() + h.sum()).backward()
        return y, h, {k: v.grad for k, v in leaves.items() if torch.is_tensor(v)}

    y_ref, h_ref, g_ref = run(kw)
    y, h, grads = run({k: time_major(k, v) for k, v in kw.items()})
    if min(y.shape[1:]) > 1:
        assert y.transpose(-1, -2).is_contiguous()  # no transposing back and forth
    assert_close(y, y_ref, msg="y")
    assert_close(h, h_ref, msg="final state")
    for name, expected in g_ref.items():
        assert_close(grads[name], expected, msg=f"d loss / d {name}")


@given(kw=problems(max_t=30), chunk=st.integers(1, 12))
def test_decays_of_either_sign(kw, chunk):
    """Δ may be negative when no softplus is asked for (growth instead of decay): the
    chunk's exponents stay within budget as |Γ_t - Γ_ref| <= Σ |Δ| / 2 for any signs."""
    kw = {**kw, "delta_softplus": False}
    kw.pop("delta_bias", None)
    flip = torch.rand(kw["delta"].shape, generator=torch.Generator().manual_seed(2)) < 0.3
    kw["delta"] = torch.where(flip, -kw["delta"], kw["delta"])  # about 30% negative
    y_seq, h_seq = selective_scan_sequential(**kw, return_final_state=True)
    y_chk, h_chk = selective_scan_chunked(**kw, return_final_state=True, chunk_size=chunk)
    assert_close(y_chk, y_seq, msg=f"chunk={chunk}")
    assert_close(h_chk, h_seq, msg=f"chunk={chunk}: final state")


def test_half_precision_scans_in_fp32():
    g = torch.Generator().manual_seed(0)
    b, d, n, t = 1, 4, 3, 33
    kw = dict(u=torch.randn(b, d, t, generator=g), delta=torch.randn(b, d, t, generator=g),
              A=-torch.rand(d, n, generator=g), B=torch.randn(b, n, t, generator=g),
              C=torch.randn(b, n, t, generator=g), z=torch.randn(b, d, t, generator=g))
    half = {k: v.bfloat16() for k, v in kw.items()}
    y, h = selective_scan_chunked(**half, delta_softplus=True, return_final_state=True, chunk_size=4)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    y32, _ = selective_scan_sequential(**{k: v.float() for k, v in half.items()}, delta_softplus=True,
                                       return_final_state=True)
    # The only bf16 rounding left is the final cast of y.
    torch.testing.assert_close(y.float(), y32, rtol=2**-8, atol=1e-6)


def test_shape_errors_are_clear():
    u = torch.randn(1, 4, 5)
    A = -torch.rand(4, 3)
    B = torch.randn(1, 3, 5)
    with pytest.raises(ValueError, match="delta"):
        selective_scan(u, torch.randn(1, 4, 6), A, B, B)
    with pytest.raises(ValueError, match="A"):
        selective_scan(u, u, -torch.rand(5, 3), B, B)
    with pytest.raises(ValueError, match="groups do not divide"):
        selective_scan(u, u, A, torch.randn(1, 3, 3, 5), B)
    with pytest.raises(ValueError, match="C"):
        selective_scan(u, u, A, B, torch.randn(1, 2, 5))
    with pytest.raises(ValueError, match="initial_state"):
        selective_scan(u, u, A, B, B, initial_state=torch.zeros(1, 4, 2))
    with pytest.raises(NotImplementedError, match="complex"):
        selective_scan(u, u, torch.complex(A, A), B, B)
    with pytest.raises(ValueError, match="method"):
        selective_scan(u, u, A, B, B, method="parallel")


def test_empty_sequence_returns_the_initial_state():
    h0 = torch.randn(2, 4, 3)
    for fn in (selective_scan_sequential, selective_scan_chunked):
        y, h = fn(torch.randn(2, 4, 0), torch.randn(2, 4, 0), -torch.rand(4, 3), torch.randn(2, 3, 0),
                  torch.randn(2, 3, 0), initial_state=h0, return_final_state=True)
        assert y.shape == (2, 4, 0)
        assert torch.equal(h, h0)


def test_softplus_matches_torch():
    """The test's written-out softplus is torch's (guards the oracle itself)."""
    x = torch.linspace(-5, 5, 11, dtype=torch.float64)
    assert_close(torch.log1p(torch.exp(x)), F.softplus(x))


# -- negative eigenvalues (Grazzi et al. 2024): transition 2·exp(ΔA) − 1 -------------------
def _neg_problem(kw):
    """Δ scaled up so that many transitions 2·exp(ΔA) − 1 are negative, and channel 0 given
    Δ = log 2, A = −1: its transition 2·exp(−log 2) − 1 is exactly 0 (checked)."""
    kw = dict(kw)
    kw["delta"] = kw["delta"] * 4
    kw["A"] = kw["A"].clone()
    kw["A"][0] = -1.0
    kw["delta"] = kw["delta"].clone()
    if kw["delta_softplus"]:
        kw["delta"][:, 0] = -kw["delta_bias"][0] if "delta_bias" in kw else 0.0  # softplus(0) = log 2
    else:
        kw["delta"][:, 0] = math.log(2)
    d0 = kw["delta"][:, 0] + (kw["delta_bias"][0] if "delta_bias" in kw else 0.0)
    d0 = F.softplus(d0) if kw["delta_softplus"] else d0
    assert torch.equal(2 * torch.exp(d0[..., None] * kw["A"][0]) - 1, torch.zeros(*d0.shape, kw["A"].shape[1],
                                                                                  dtype=d0.dtype))
    return kw


@given(kw=problems(), chunk=st.sampled_from([None, 1, 3, 8]))
def test_neg_eigval_every_method_equals_the_paper_loop(kw, chunk):
    kw = _neg_problem(kw)
    y_ref, h_ref = paper_loop(**kw, neg_eigval=True)
    for method in ("sequential", "chunked", "auto"):
        y, h = selective_scan(**kw, return_final_state=True, method=method, chunk_size=chunk, allow_neg_eigval=True)
        assert_close(y, y_ref, msg=f"{method}, chunk={chunk}")
        assert_close(h, h_ref, msg=f"{method}, chunk={chunk}: final state")
    y, h = selective_scan_chunked(**kw, return_final_state=True, chunk_size=chunk, allow_neg_eigval=True)
    assert_close(y, y_ref, msg="selective_scan_chunked called directly")


def test_neg_eigval_transition_is_two_exp_minus_one_and_can_be_zero():
    """u = 0: the state only decays, h_1 = (2·exp(ΔA) − 1) h_0 exactly; Δ = log 2, A = −1
    gives a transition of exactly 0, a large Δ one near −1 (the state flips sign)."""
    A = -torch.tensor([[1.0, 1.0, 4.0]], dtype=torch.float64)  # (D=1, N=3)
    delta = torch.tensor([[[math.log(2)]]], dtype=torch.float64)  # (B, D, T=1)
    h0 = torch.tensor([[[1.0, -2.0, 3.0]]], dtype=torch.float64)
    delta_big = delta.clone().fill_(3.0)
    zeros_u, B, C = torch.zeros(1, 1, 1, dtype=torch.float64), torch.ones(1, 3, 1, dtype=torch.float64), \
        torch.ones(1, 3, 1, dtype=torch.float64)
    for method in ("sequential", "chunked"):
        _, h = selective_scan(zeros_u, delta, A, B, C, initial_state=h0, return_final_state=True,
                              method=method, allow_neg_eigval=True)
        assert torch.equal(h[0, 0, :2], torch.zeros(2, dtype=torch.float64))  # exactly 0
        assert_close(h, (2 * torch.exp(delta[..., 0, None] * A) - 1) * h0)
        _, h = selective_scan(zeros_u, delta_big, A, B, C, initial_state=h0, return_final_state=True,
                              method=method, allow_neg_eigval=True)
        expected = (2 * torch.exp(3.0 * A) - 1) * h0
        assert_close(h, expected)
        assert (torch.sign(h) == -torch.sign(h0)).all()  # every eigenvalue < 0: the state flips
        _, h_pos = selective_scan(zeros_u, delta_big, A, B, C, initial_state=h0, return_final_state=True,
                                  method=method)
        assert (torch.sign(h_pos) == torch.sign(h0)).all()  # without the option it only decays


@given(kw=problems(max_t=10), chunk=st.integers(1, 5))
def test_neg_eigval_gradients_agree_with_the_paper_loop(kw, chunk):
    kw = _neg_problem(kw)

    def grads(fn, **extra):
        leaves = {k: v.detach().clone().requires_grad_() if torch.is_tensor(v) else v for k, v in kw.items()}
        y, h = fn(**leaves, **extra)
        g = torch.Generator().manual_seed(1)
        loss = ((y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum()
                + (h * torch.randn(h.shape, generator=g, dtype=h.dtype)).sum())
        loss.backward()
        return {k: v.grad for k, v in leaves.items() if torch.is_tensor(v)}

    expected = grads(paper_loop, neg_eigval=True)
    got = grads(selective_scan, return_final_state=True, method="chunked", chunk_size=chunk, allow_neg_eigval=True)
    for name, e in expected.items():
        assert e is not None and torch.isfinite(e).all(), name
        assert_close(got[name], e, msg=f"d loss / d {name}")


def test_neg_eigval_gradcheck_through_a_zero_transition():
    g = torch.Generator().manual_seed(3)
    u = torch.randn(1, 2, 6, generator=g, dtype=torch.float64)
    B, C = (torch.randn(1, 3, 6, generator=g, dtype=torch.float64) for _ in range(2))
    delta = torch.rand(1, 2, 6, generator=g, dtype=torch.float64) * 3
    delta[0, 0, 2] = math.log(2)
    A = -torch.rand(2, 3, generator=g, dtype=torch.float64) - 0.5
    A[0] = -1.0  # channel 0, token 2: transition exactly 0
    h0 = torch.randn(1, 2, 3, generator=g, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (u, delta, A, B, C, h0)]

    def f(u, delta, A, B, C, h0):
        return selective_scan(u, delta, A, B, C, initial_state=h0, return_final_state=True,
                              method="chunked", allow_neg_eigval=True)

    assert torch.autograd.gradcheck(f, inputs)


def test_neg_eigval_is_refused_by_the_mamba_ssm_method():
    kw = dict(u=torch.zeros(1, 2, 3), delta=torch.ones(1, 2, 3), A=-torch.ones(2, 1), B=torch.ones(2, 1),
              C=torch.ones(2, 1))
    with pytest.raises(ValueError, match="negative eigenvalues"):
        selective_scan(**kw, method="mamba_ssm", allow_neg_eigval=True)
