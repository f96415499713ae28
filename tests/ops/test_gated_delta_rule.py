"""The gated delta rule op (Gated DeltaNet): chunked == recurrent at any T, chunk and split,
its reduction to the delta rule, gradients, and flash-linear-attention's naive references."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from seqzoo.ops.delta_rule import delta_rule
from seqzoo.ops.gated_delta_rule import gated_delta_rule, gated_delta_rule_recurrent, gated_delta_rule_step
from tests.helpers import assert_close

DTYPES = [torch.float64, torch.float32]


def make_inputs(b: int, t: int, h: int, dk: int, dv: int, *, dtype=torch.float64, seed: int = 0,
                beta_max: float = 1.0, decay_max: float = 1.0):
    """L2-normalised keys, β ∈ (0, beta_max), log decay g ∈ (−decay_max, 0]."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, dk, generator=gen, dtype=torch.float64)
    k = F.normalize(torch.randn(b, t, h, dk, generator=gen, dtype=torch.float64), dim=-1)
    v = torch.randn(b, t, h, dv, generator=gen, dtype=torch.float64)
    g = -torch.rand(b, t, h, generator=gen, dtype=torch.float64) * decay_max
    beta = torch.rand(b, t, h, generator=gen, dtype=torch.float64) * beta_max
    s0 = torch.randn(b, h, dk, dv, generator=gen, dtype=torch.float64)
    return [z.to(dtype) for z in (q, k, v, g, beta, s0)]


shapes = st.fixed_dictionaries({
    "b": st.integers(1, 2), "t": st.integers(1, 40), "h": st.integers(1, 3),
    "dk": st.sampled_from([2, 4, 8]), "dv": st.sampled_from([1, 3, 8]),
    "chunk": st.sampled_from([1, 2, 5, 8, 16, 64]), "seed": st.integers(0, 2**16),
    "beta_max": st.sampled_from([1.0, 2.0]),
    # strong decays make e^{γ} underflow inside long chunks: the form must stay exact there too
    "decay_max": st.sampled_from([0.1, 1.0, 30.0]),
})


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(p=shapes, with_state=st.booleans())
def test_chunked_equals_recurrent(dtype, p, with_state):
    q, k, v, g, beta, s0 = make_inputs(p["b"], p["t"], p["h"], p["dk"], p["dv"], dtype=dtype, seed=p["seed"],
                                       beta_max=p["beta_max"], decay_max=p["decay_max"])
    s0 = s0 if with_state else None
    o_ref, s_ref = gated_delta_rule_recurrent(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    o, s = gated_delta_rule(q, k, v, g, beta, chunk_size=p["chunk"], initial_state=s0, output_final_state=True)
    assert o.shape == v.shape and o.dtype == dtype
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert_close(o, o_ref, dtype, f"{p}")
    assert_close(s, s_ref, dtype, f"{p} final state")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(p=shapes, cut=st.floats(0.0, 1.0))
def test_chaining_at_any_split(dtype, p, cut):
    q, k, v, g, beta, s0 = make_inputs(p["b"], p["t"], p["h"], p["dk"], p["dv"], dtype=dtype, seed=p["seed"],
                                       decay_max=p["decay_max"])
    t1 = int(cut * p["t"])
    kw = dict(chunk_size=p["chunk"], output_final_state=True)
    o_full, s_full = gated_delta_rule(q, k, v, g, beta, initial_state=s0, **kw)
    o1, s1 = gated_delta_rule(q[:, :t1], k[:, :t1], v[:, :t1], g[:, :t1], beta[:, :t1], initial_state=s0, **kw)
    o2, s2 = gated_delta_rule(q[:, t1:], k[:, t1:], v[:, t1:], g[:, t1:], beta[:, t1:], initial_state=s1, **kw)
    assert_close(torch.cat([o1, o2], 1), o_full, dtype, f"split at {t1}")
    assert_close(s2, s_full, dtype, f"split at {t1}: final state")


def test_no_decay_is_the_delta_rule():
    q, k, v, g, beta, s0 = make_inputs(2, 23, 2, 4, 3, seed=2)
    o_g, s_g = gated_delta_rule(q, k, v, torch.zeros_like(g), beta, chunk_size=8, initial_state=s0,
                                output_final_state=True)
    o_d, s_d = delta_rule(q, k, v, beta, chunk_size=5, initial_state=s0, output_final_state=True)
    assert_close(o_g, o_d, torch.float64)
    assert_close(s_g, s_d, torch.float64)


def test_zero_beta_only_decays():
    """β = 0 writes nothing: the state just decays by Π α_t = exp(Σ g_t)."""
    q, k, v, g, beta, s0 = make_inputs(1, 11, 2, 4, 3, seed=4)
    _, s = gated_delta_rule(q, k, v, g, torch.zeros_like(beta), chunk_size=4, initial_state=s0,
                            output_final_state=True)
    assert_close(s, s0 * g.sum(1).exp()[..., None, None], torch.float64)


def test_step_matches_hand_computation():
    q, k, v, g, beta, s0 = make_inputs(2, 1, 3, 4, 5, seed=3)
    o, s = gated_delta_rule_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], s0, scale=0.5)
    kk, vv = k[:, 0, :, :, None], v[:, 0, :, None, :]
    bb, aa = beta[:, 0, :, None, None], g[:, 0, :, None, None].exp()
    eye = torch.eye(4, dtype=torch.float64)
    expected = aa * (eye - bb * kk @ kk.transpose(-1, -2)) @ s0 + bb * kk @ vv  # α(I − βkkᵀ)S + βkvᵀ
    assert_close(s, expected, torch.float64)
    assert_close(o, torch.einsum("bhk,bhkv->bhv", q[:, 0] * 0.5, expected), torch.float64)


def test_gradients_chunked_equal_recurrent():
    q, k, v, g, beta, s0 = make_inputs(2, 19, 2, 4, 3, seed=5, beta_max=2.0)
    leaves = [z.clone().requires_grad_() for z in (q, k, v, g, beta, s0)]
    weight = torch.randn(2, 19, 2, 3, dtype=torch.float64)
    weight_s = torch.randn(2, 2, 4, 3, dtype=torch.float64)

    def grads(fn, **kw):
        o, s = fn(*leaves[:5], initial_state=leaves[5], output_final_state=True, **kw)
        return torch.autograd.grad((o * weight).sum() + (s * weight_s).sum(), leaves)

    ref = grads(gated_delta_rule_recurrent)
    for chunk in (1, 4, 8):
        for a, b, name in zip(grads(gated_delta_rule, chunk_size=chunk), ref, ["q", "k", "v", "g", "beta", "state"]):
            assert_close(a, b, torch.float64, f"d{name}, chunk={chunk}")


# -- external oracle: flash-linear-attention's pure-PyTorch references ((B, T, H, D) layout;
#    the recurrent one takes (beta, g), the chunked one (g, beta); both take g in log space) --
def _fla_naive_in(dtype: torch.dtype):
    """fla's naive module, with its hard-coded ``torch.float32`` casts pointing at ``dtype``
    so that its fp64 run really is fp64 (the maths is untouched)."""
    naive = pytest.importorskip("fla.ops.gated_delta_rule.naive")
    proxy = types.SimpleNamespace(**{name: getattr(torch, name) for name in dir(torch) if not name.startswith("__")})
    proxy.float32 = proxy.float = dtype
    return naive, proxy


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t", [1, 21])
def test_oracle_fla_recurrent(dtype, t, monkeypatch):
    naive, proxy = _fla_naive_in(dtype)
    monkeypatch.setattr(naive, "torch", proxy)
    q, k, v, g, beta, s0 = make_inputs(2, t, 3, 16, 8, dtype=dtype, seed=t, beta_max=2.0)
    o_fla, s_fla = naive.naive_recurrent_gated_delta_rule(q, k, v, beta, g, initial_state=s0,
                                                          output_final_state=True)
    o, s = gated_delta_rule(q, k, v, g, beta, chunk_size=8, initial_state=s0, output_final_state=True)
    assert o_fla.dtype == dtype
    assert_close(o, o_fla, dtype, "vs fla naive_recurrent_gated_delta_rule")
    assert_close(s, s_fla, dtype, "final state vs fla")


@pytest.mark.parametrize("t", [5, 40])
def test_oracle_fla_chunk_fp32(t):
    """fla's naive chunk form rounds its decay mask to fp32 (``.float()``), so it is an fp32 oracle."""
    naive = pytest.importorskip("fla.ops.gated_delta_rule.naive")
    q, k, v, g, beta, s0 = make_inputs(1, t, 2, 16, 8, dtype=torch.float32, seed=t)
    o_fla, s_fla = naive.naive_chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=16, initial_state=s0,
                                                      output_final_state=True)
    o, s = gated_delta_rule(q, k, v, g, beta, chunk_size=8, initial_state=s0, output_final_state=True)
    assert_close(o, o_fla, torch.float32, "vs fla naive_chunk_gated_delta_rule")
    assert_close(s, s_fla, torch.float32, "final state vs fla")


def test_bfloat16_inputs_run_in_fp32():
    """Half-precision inputs are computed in fp32: judged by the relative error of the whole
    tensor against the fp64 recurrence (as the kernel libraries judge bf16)."""
    x64 = make_inputs(2, 50, 2, 16, 8, seed=9)
    q, k, v, g, beta, s0 = (z.to(torch.bfloat16) for z in x64)
    o, s = gated_delta_rule(q, k, v, g, beta, chunk_size=16, initial_state=s0.float(), output_final_state=True)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    o_ref, _ = gated_delta_rule_recurrent(*(z.double() for z in (q, k, v, g, beta)), initial_state=s0.double())
    rel = (o.double() - o_ref).norm() / o_ref.norm()
    assert rel < 1e-2, f"relative error {rel:.2e}"
    o_step, s_step = gated_delta_rule_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], s0.float())
    assert o_step.dtype == torch.bfloat16 and s_step.dtype == torch.float32
