"""The delta rule op: chunked (WY/UT) == recurrent at any T, chunk and split point, the
associative-memory semantics, gradients, and flash-linear-attention's naive references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from hypothesis import given
from hypothesis import strategies as st

from seqzoo.ops.delta_rule import delta_rule, delta_rule_recurrent, delta_rule_step, unit_lower_inverse
from tests.helpers import assert_close

DTYPES = [torch.float64, torch.float32]


def make_inputs(b: int, t: int, h: int, dk: int, dv: int, *, dtype=torch.float64, seed: int = 0,
                beta_max: float = 1.0):
    """Random inputs as a DeltaNet layer produces them: L2-normalised keys, β ∈ (0, beta_max)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, dk, generator=g, dtype=torch.float64)
    k = F.normalize(torch.randn(b, t, h, dk, generator=g, dtype=torch.float64), dim=-1)
    v = torch.randn(b, t, h, dv, generator=g, dtype=torch.float64)
    beta = torch.rand(b, t, h, generator=g, dtype=torch.float64) * beta_max
    s0 = torch.randn(b, h, dk, dv, generator=g, dtype=torch.float64)
    return [z.to(dtype) for z in (q, k, v, beta, s0)]


shapes = st.fixed_dictionaries({
    "b": st.integers(1, 2), "t": st.integers(1, 40), "h": st.integers(1, 3),
    "dk": st.sampled_from([2, 4, 8]), "dv": st.sampled_from([1, 3, 8]),
    "chunk": st.sampled_from([1, 2, 5, 8, 16, 64]), "seed": st.integers(0, 2**16),
    "beta_max": st.sampled_from([1.0, 2.0]),
})


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(p=shapes, with_state=st.booleans())
def test_chunked_equals_recurrent(dtype, p, with_state):
    q, k, v, beta, s0 = make_inputs(p["b"], p["t"], p["h"], p["dk"], p["dv"], dtype=dtype, seed=p["seed"],
                                    beta_max=p["beta_max"])
    s0 = s0 if with_state else None
    o_ref, s_ref = delta_rule_recurrent(q, k, v, beta, initial_state=s0, output_final_state=True)
    o, s = delta_rule(q, k, v, beta, chunk_size=p["chunk"], initial_state=s0, output_final_state=True)
    assert o.shape == v.shape and o.dtype == dtype
    assert_close(o, o_ref, dtype, f"{p}")
    assert_close(s, s_ref, dtype, f"{p} final state")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(p=shapes, cut=st.floats(0.0, 1.0))
def test_chaining_at_any_split(dtype, p, cut):
    q, k, v, beta, s0 = make_inputs(p["b"], p["t"], p["h"], p["dk"], p["dv"], dtype=dtype, seed=p["seed"])
    t1 = int(cut * p["t"])
    o_full, s_full = delta_rule(q, k, v, beta, chunk_size=p["chunk"], initial_state=s0, output_final_state=True)
    o1, s1 = delta_rule(q[:, :t1], k[:, :t1], v[:, :t1], beta[:, :t1], chunk_size=p["chunk"],
                        initial_state=s0, output_final_state=True)
    o2, s2 = delta_rule(q[:, t1:], k[:, t1:], v[:, t1:], beta[:, t1:], chunk_size=p["chunk"],
                        initial_state=s1, output_final_state=True)
    assert_close(torch.cat([o1, o2], 1), o_full, dtype, f"split at {t1}")
    assert_close(s2, s_full, dtype, f"split at {t1}: final state")


def test_final_state_only_when_asked():
    q, k, v, beta, _ = make_inputs(1, 5, 2, 4, 4)
    assert delta_rule(q, k, v, beta)[1] is None
    assert delta_rule_recurrent(q, k, v, beta)[1] is None


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_orthonormal_keys_are_recalled_exactly(chunk):
    """With β = 1 the delta rule overwrites: after writing (k_i, v_i) for orthonormal keys,
    reading with q = k_i returns v_i exactly, whatever was stored before (Schlag et al. 2021)."""
    dk, dv, h = 8, 3, 2
    g = torch.Generator().manual_seed(1)
    keys = torch.linalg.qr(torch.randn(h, dk, dk, generator=g, dtype=torch.float64))[0]  # columns orthonormal
    k = rearrange(keys, "h k t -> 1 t h k")  # (1, T=dk, H, K)
    v = torch.randn(1, dk, h, dv, generator=g, dtype=torch.float64)
    beta = torch.ones(1, dk, h, dtype=torch.float64)
    s0 = torch.randn(1, h, dk, dv, generator=g, dtype=torch.float64) * 10  # old memories to overwrite
    _, state = delta_rule(k, k, v, beta, chunk_size=chunk, initial_state=s0, output_final_state=True)
    recalled = torch.einsum("bthk,bhkv->bthv", k, state)  # (1, T, H, V)
    assert_close(recalled, v, torch.float64, "orthonormal keys must be recalled exactly")


def test_step_matches_hand_computation():
    q, k, v, beta, s0 = make_inputs(2, 1, 3, 4, 5, seed=3)
    o, s = delta_rule_step(q[:, 0], k[:, 0], v[:, 0], beta[:, 0], s0, scale=0.7)
    kk, vv, bb = k[:, 0, :, :, None], v[:, 0, :, None, :], beta[:, 0, :, None, None]
    eye = torch.eye(4, dtype=torch.float64)
    expected = (eye - bb * kk @ kk.transpose(-1, -2)) @ s0 + bb * kk @ vv  # (I − βkkᵀ)S + βkvᵀ
    assert_close(s, expected, torch.float64)
    assert_close(o, torch.einsum("bhk,bhkv->bhv", q[:, 0] * 0.7, expected), torch.float64)


def test_gradients_chunked_equal_recurrent():
    q, k, v, beta, s0 = make_inputs(2, 19, 2, 4, 3, seed=5, beta_max=2.0)
    k = k.clone()
    leaves = [z.clone().requires_grad_() for z in (q, k, v, beta, s0)]
    weight = torch.randn(2, 19, 2, 3, dtype=torch.float64)
    weight_s = torch.randn(2, 2, 4, 3, dtype=torch.float64)

    def grads(fn, **kw):
        o, s = fn(*leaves[:4], initial_state=leaves[4], output_final_state=True, **kw)
        return torch.autograd.grad((o * weight).sum() + (s * weight_s).sum(), leaves)

    ref = grads(delta_rule_recurrent)
    for chunk in (1, 4, 8):
        for a, b, name in zip(grads(delta_rule, chunk_size=chunk), ref, ["q", "k", "v", "beta", "state"]):
            assert_close(a, b, torch.float64, f"d{name}, chunk={chunk}")


def test_bad_shapes_are_rejected():
    q, k, v, beta, _ = make_inputs(1, 4, 2, 4, 4)
    with pytest.raises(ValueError, match="beta"):
        delta_rule(q, k, v, beta[..., :1])
    with pytest.raises(ValueError, match="v must be"):
        delta_rule(q, k, v[:, :3], beta)


# -- external oracle: flash-linear-attention's pure-PyTorch references (layout (B, H, T, D)) --
def _to_bhtd(*xs):
    return [rearrange(x, "b t h d -> b h t d") for x in xs]  # (B, H, T, D)


@pytest.mark.parametrize("t", [1, 13, 32])
def test_oracle_fla_recurrence_fp32(t):
    naive = pytest.importorskip("fla.ops.delta_rule.naive")
    q, k, v, beta, s0 = make_inputs(2, t, 3, 16, 8, dtype=torch.float32, seed=t, beta_max=2.0)
    o_fla, s_fla = naive.delta_rule_recurrence(*_to_bhtd(q, k, v), rearrange(beta, "b t h -> b h t"),
                                               initial_state=s0, output_final_state=True)
    o, s = delta_rule(q, k, v, beta, chunk_size=8, initial_state=s0, output_final_state=True)
    assert_close(rearrange(o, "b t h v -> b h t v"), o_fla, torch.float32, "vs fla delta_rule_recurrence")
    assert_close(s, s_fla, torch.float32, "final state vs fla")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_oracle_fla_chunkwise(dtype):
    """fla's naive chunkwise form keeps the input dtype (its recurrence casts to fp32), so it
    is the fp64 oracle; it needs T a multiple of its chunk and starts from a zero state."""
    naive = pytest.importorskip("fla.ops.delta_rule.naive")
    q, k, v, beta, _ = make_inputs(2, 32, 2, 8, 4, dtype=dtype, seed=7)
    o_fla, s_fla = naive.delta_rule_chunkwise(*_to_bhtd(q, k, v), rearrange(beta, "b t h -> b h t"), chunk_size=8)
    o, s = delta_rule(q, k, v, beta, chunk_size=16, output_final_state=True)
    assert o_fla.dtype == dtype
    assert_close(rearrange(o, "b t h v -> b h t v"), o_fla, dtype, "vs fla delta_rule_chunkwise")
    assert_close(s, s_fla, dtype, "final state vs fla")


@given(c=st.integers(1, 70), leaf=st.sampled_from([1, 4, 16]), seed=st.integers(0, 2**16))
def test_unit_lower_inverse(c, leaf, seed):
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(2, 3, c, c, generator=gen, dtype=torch.float64).tril(-1) * 0.3 + torch.eye(c, dtype=torch.float64)
    inv = unit_lower_inverse(m, leaf=leaf)
    eye = torch.eye(c, dtype=torch.float64).expand_as(m)
    assert_close(inv @ m, eye, torch.float64)
    assert torch.equal(inv.triu(1), torch.zeros_like(inv)), "the inverse stays lower-triangular"
