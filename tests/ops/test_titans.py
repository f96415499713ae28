"""The chunked Titans memory op against its per-token autograd reference (fp64, DESIGN.md 5.9)
and against the paper's recurrence written out by hand for a matrix memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from seqzoo.ops.titans import TitansState, init_state, memory_read, titans_memory
from seqzoo.ops.titans_naive import titans_memory_naive
from tests.helpers import assert_close

F64 = torch.float64


def make_inputs(seed: int, *, b: int = 2, t: int = 9, h: int = 2, k: int = 4, v: int = 4, depth: int = 2,
                expansion: int = 2, bias: bool = False, dtype=F64, theta_max: float = 0.3):
    """Inputs as the mixer feeds them: unit-norm q, k, gates in range, 1/sqrt(d) weights."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=g, dtype=F64)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=F64)

    q, kk = F.normalize(randn(b, t, h, k), dim=-1), F.normalize(randn(b, t, h, k), dim=-1)
    vv = randn(b, t, h, v)
    theta, eta, alpha = rand(b, t, h) * theta_max, rand(b, t, h), rand(b, t, h) * 0.5
    dims = [k] + [k * expansion] * (depth - 1) + [v]
    weights = [randn(b, h, dims[i] + int(bias), dims[i + 1]) / dims[i] ** 0.5 for i in range(depth)]
    cast = lambda x: x.to(dtype)  # noqa: E731
    return [cast(q), cast(kk), cast(vv), cast(theta), cast(eta), cast(alpha), [cast(w) for w in weights]]


def assert_states_close(a: TitansState, b: TitansState, dtype=F64) -> None:
    assert a.pos == b.pos
    for field in ("start", "weights", "momentum"):
        for x, y in zip(getattr(a, field), getattr(b, field)):
            assert_close(x, y, dtype, f"state.{field}")


options = st.sampled_from([
    dict(),
    dict(activation="gelu"),
    dict(residual=True),
    dict(bias=True),
    dict(residual=True, bias=True, ln=True),
    dict(activation="gelu_tanh", ln=True),
    # the soft gradient clip, at norms where it binds (random v: ||u|| ~ 4)
    dict(max_grad_norm=1.0),
    dict(bias=True, max_grad_norm=0.5, activation="gelu"),
    dict(residual=True, bias=True, ln=True, max_grad_norm=0.7),
])


def resolve(opts: dict, h: int, v: int, seed: int) -> dict:
    opts = dict(opts)
    if opts.pop("ln", False):
        g = torch.Generator().manual_seed(seed + 1)
        opts["ln"] = (1 + 0.3 * torch.randn(h, v, generator=g, dtype=F64), 0.3 * torch.randn(h, v, generator=g, dtype=F64))
    return opts


@given(chunk=st.integers(1, 16), depth=st.integers(1, 3), t=st.integers(1, 20), read=st.sampled_from(["token", "chunk_start"]),
       opts=options, seed=st.integers(0, 2**16))
def test_chunked_equals_naive_loop(chunk, depth, t, read, opts, seed):
    opts = resolve(opts, 2, 4, seed)
    args = make_inputs(seed, t=t, depth=depth, bias=opts.get("bias", False))
    o, s = titans_memory(*args, chunk_size=chunk, read=read, output_final_state=True, **opts)
    o_ref, s_ref = titans_memory_naive(*args, chunk_size=chunk, read=read, output_final_state=True, **opts)
    assert_close(o, o_ref, F64, f"chunk={chunk} depth={depth} T={t} read={read}")
    assert_states_close(s, s_ref)
    assert s.pos == t % chunk


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 8, 16])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_chunk_sizes_and_depths(chunk, depth):
    """The grid of the issue, ragged T (19 is a multiple of none of the chunk sizes > 1)."""
    args = make_inputs(chunk * 10 + depth, t=19, depth=depth)
    o, s = titans_memory(*args, chunk_size=chunk, output_final_state=True)
    o_ref, s_ref = titans_memory_naive(*args, chunk_size=chunk, output_final_state=True)
    assert_close(o, o_ref, F64)
    assert_states_close(s, s_ref)


@given(chunk=st.integers(1, 8), depth=st.integers(1, 3), read=st.sampled_from(["token", "chunk_start"]),
       opts=options, seed=st.integers(0, 2**16))
def test_gradients_equal_naive(chunk, depth, read, opts, seed):
    opts = resolve(opts, 2, 4, seed)
    args = make_inputs(seed, b=1, t=11, depth=depth, bias=opts.get("bias", False))
    leaves = [*args[:6], *args[6], *(opts["ln"] if "ln" in opts else ())]
    for x in leaves:
        x.requires_grad_()
    w = torch.randn(1, 11, 2, 4, generator=torch.Generator().manual_seed(seed), dtype=F64)
    grads = []
    for fn in (titans_memory, titans_memory_naive):
        o, s = fn(*args, chunk_size=chunk, read=read, output_final_state=True, **opts)
        loss = (o * w).sum() + sum((x * x).sum() for x in (*s.weights, *s.momentum))
        grads.append(torch.autograd.grad(loss, leaves))
    names = ["q", "k", "v", "theta", "eta", "alpha", *[f"W{i}" for i in range(depth)], "ln_w", "ln_b"]
    for name, a, b in zip(names, *grads):
        assert_close(a, b, F64, f"d/d{name}")


@given(chunk=st.integers(1, 6), t=st.integers(2, 20), read=st.sampled_from(["token", "chunk_start"]),
       data=st.data(), seed=st.integers(0, 2**16))
def test_state_carries_across_any_split(chunk, t, read, data, seed):
    """Pieces that end mid-chunk continue the same computation (and equal the naive loop)."""
    args = make_inputs(seed, t=t, depth=2)
    q, k, v, theta, eta, alpha, weights = args
    o_full, s_full = titans_memory(*args, chunk_size=chunk, read=read, output_final_state=True)
    bounds = sorted(set(data.draw(st.lists(st.integers(1, t - 1), min_size=1, max_size=3), label="cuts")))
    state, pieces = None, []
    for lo, hi in zip([0, *bounds], [*bounds, t]):
        sl = slice(lo, hi)
        o, state = titans_memory(q[:, sl], k[:, sl], v[:, sl], theta[:, sl], eta[:, sl], alpha[:, sl],
                                 weights, chunk_size=chunk, read=read, initial_state=state, output_final_state=True)
        pieces.append(o)
    assert_close(torch.cat(pieces, 1), o_full, F64, f"cuts={bounds}")
    assert_states_close(state, s_full)
    # the naive loop takes and gives the same state
    mid = bounds[0]
    _, s_mid = titans_memory_naive(*[x[:, :mid] for x in args[:6]], weights, chunk_size=chunk, read=read,
                                   output_final_state=True)
    o_rest, _ = titans_memory_naive(*[x[:, mid:] for x in args[:6]], None, chunk_size=chunk, read=read,
                                    initial_state=s_mid, output_final_state=True)
    assert_close(o_rest, o_full[:, mid:], F64)


def test_chunk_size_one_is_the_papers_token_recurrence():
    """Eq. 13-14 by hand for a matrix memory M(x) = x W: grad ||kW - v||^2 = 2 k^T (kW - v)."""
    q, k, v, theta, eta, alpha, (w,) = make_inputs(3, t=13, depth=1)
    o, s = titans_memory(q, k, v, theta, eta, alpha, [w], chunk_size=1, output_final_state=True)
    m, mom, ys = w, torch.zeros_like(w), []
    for t in range(q.shape[1]):
        kt, vt = k[:, t, :, None, :], v[:, t, :, None, :]  # (B, H, 1, K)
        u = 2 * kt.transpose(-1, -2) @ (kt @ m - vt)
        mom = eta[:, t, :, None, None] * mom - theta[:, t, :, None, None] * u
        m = (1 - alpha[:, t, :, None, None]) * m + mom
        ys.append((q[:, t, :, None, :] @ m)[:, :, 0])
    assert_close(o, torch.stack(ys, 1), F64)
    assert_close(s.weights[0], m, F64)
    assert_close(s.momentum[0], mom, F64)


def test_chunked_gradients_use_chunk_start_weights():
    """With b > 1 every gradient of a chunk is taken at the chunk-start weights (eq. 16):
    for a matrix memory without momentum or decay, M_b = M_0 - sum_i theta_i 2 k_i^T (k_i M_0 - v_i)."""
    q, k, v, theta, _, _, (w,) = make_inputs(4, t=6, depth=1)
    zeros = torch.zeros_like(theta)
    _, s = titans_memory(q, k, v, theta, zeros, zeros, [w], chunk_size=6, output_final_state=True)
    kk, vv = (x.transpose(1, 2) for x in (k, v))  # (B, H, T, K)
    grad = 2 * kk.transpose(-1, -2) @ (theta.transpose(1, 2)[..., None] * (kk @ w - vv))
    assert_close(s.weights[0], w - grad, F64)
    assert s.pos == 0 and s.start[0] is s.weights[0]


@pytest.mark.parametrize("gates", ["no_momentum", "no_forgetting", "neither", "full_forgetting"])
def test_boundary_gates_are_exact(gates):
    """eta = 0, alpha = 0 and alpha = 1 exactly (the paper's ablations) stay finite and exact."""
    q, k, v, theta, eta, alpha, weights = make_inputs(5, t=15, depth=2)
    if gates == "no_momentum":
        eta = torch.zeros_like(eta)
    elif gates == "no_forgetting":
        alpha = torch.zeros_like(alpha)
    elif gates == "neither":  # TTT
        eta, alpha = torch.zeros_like(eta), torch.zeros_like(alpha)
    else:
        alpha = torch.ones_like(alpha)
    leaves = [q, k, v, theta, *weights]
    for x in leaves:
        x.requires_grad_()
    args = (q, k, v, theta, eta, alpha, weights)
    o, s = titans_memory(*args, chunk_size=4, output_final_state=True)
    o_ref, s_ref = titans_memory_naive(*args, chunk_size=4, output_final_state=True)
    assert torch.isfinite(o).all()
    assert_close(o, o_ref, F64)
    assert_states_close(s, s_ref)
    # constant gates take the op's shortcuts (terms exactly 0 or 1): gradients still agree
    loss = lambda o, s: (o * o_ref.detach()).sum() + sum((x * x).sum() for x in (*s.weights, *s.momentum))  # noqa: E731
    for a, b in zip(torch.autograd.grad(loss(o, s), leaves), torch.autograd.grad(loss(o_ref, s_ref), leaves)):
        assert_close(a, b, F64)


def test_memory_read_writes_nothing():
    q, k, v, theta, eta, alpha, weights = make_inputs(6, t=7, depth=3)
    state = init_state(weights)
    # theta = 0 and alpha = 0: the memory never changes, so every read-out is M_0(q)
    o, s = titans_memory(q, k, v, torch.zeros_like(theta), eta, torch.zeros_like(alpha), None, chunk_size=3,
                         initial_state=state, output_final_state=True)
    assert_close(memory_read(state, q), o, F64)
    # reading the final state of a real run is M_T(q), the next token's weights before its write
    _, s = titans_memory(q, k, v, theta, eta, alpha, weights, chunk_size=3, output_final_state=True)
    _, s_ref = titans_memory_naive(q, k, v, theta, eta, alpha, weights, chunk_size=3, output_final_state=True)
    assert_close(memory_read(s, q), memory_read(list(s_ref.weights), q), F64)


def test_fp32_matches_fp64():
    args64 = make_inputs(7, t=40, depth=2, k=8, v=8)
    args32 = [x.float() for x in args64[:6]] + [[w.float() for w in args64[6]]]
    o64, _ = titans_memory(*args64, chunk_size=16)
    o32, _ = titans_memory(*args32, chunk_size=16)
    assert o32.dtype == torch.float32
    assert_close(o32, o64.float(), torch.float32)


def test_bad_inputs_are_named():
    args = make_inputs(8, t=5, depth=2)
    with pytest.raises(ValueError, match="chunk_size"):
        titans_memory(*args, chunk_size=0)
    with pytest.raises(ValueError, match="read"):
        titans_memory(*args, chunk_size=2, read="tokens")
    with pytest.raises(ValueError, match="activation"):
        titans_memory(*args, chunk_size=2, activation="tanh")
    with pytest.raises(ValueError, match="theta"):
        titans_memory(args[0], args[1], args[2], args[3][:, :2], *args[4:], chunk_size=2)
    with pytest.raises(ValueError, match="weights"):
        titans_memory(*args[:6], None, chunk_size=2)


@given(chunk=st.integers(1, 6), t=st.integers(2, 16), read=st.sampled_from(["token", "chunk_start"]),
       opts=options, data=st.data(), seed=st.integers(0, 2**16))
def test_gradients_across_split_calls(chunk, t, read, opts, data, seed):
    """The hand-written backward carries gradients through states handed between calls that
    stop mid-chunk (separate chunk-start weights) and at chunk boundaries alike."""
    opts = resolve(opts, 2, 4, seed)
    args = make_inputs(seed, b=1, t=t, depth=2, bias=opts.get("bias", False))
    leaves = [*args[:6], *args[6], *(opts["ln"] if "ln" in opts else ())]
    for x in leaves:
        x.requires_grad_()
    q, k, v, theta, eta, alpha, weights = args
    cuts = sorted(set(data.draw(st.lists(st.integers(1, t - 1), min_size=1, max_size=3), label="cuts")))
    w = torch.randn(1, t, 2, 4, generator=torch.Generator().manual_seed(seed), dtype=F64)

    def loss(o, s):
        return (o * w).sum() + sum((x * x).sum() for x in (*s.start, *s.weights, *s.momentum))

    state, pieces = None, []
    for lo, hi in zip([0, *cuts], [*cuts, t]):
        sl = slice(lo, hi)
        o, state = titans_memory(q[:, sl], k[:, sl], v[:, sl], theta[:, sl], eta[:, sl], alpha[:, sl], weights,
                                 chunk_size=chunk, read=read, initial_state=state, output_final_state=True, **opts)
        pieces.append(o)
    got = torch.autograd.grad(loss(torch.cat(pieces, 1), state), leaves)
    o_ref, s_ref = titans_memory_naive(*args, chunk_size=chunk, read=read, output_final_state=True, **opts)
    want = torch.autograd.grad(loss(o_ref, s_ref), leaves)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(a, b, F64, f"leaf {i}, cuts={cuts}")


def test_activation_derivatives_match_autograd():
    """The key pass's backward uses f'' of the memory's activation: check f' (the fused VJPs)
    and f'' against autograd for every activation."""
    from seqzoo.ops.titans_math import ACTIVATIONS

    z = torch.linspace(-6, 6, 241, dtype=F64, requires_grad=True)
    g = torch.randn(241, generator=torch.Generator().manual_seed(0), dtype=F64)
    for name, act in ACTIVATIONS.items():
        d1 = torch.autograd.grad(act.f(z).sum(), z, create_graph=True)[0]
        d2 = torch.autograd.grad(d1.sum(), z)[0] if d1.requires_grad else torch.zeros_like(z)  # relu: f' constant
        assert_close(act.grad(z.detach()), d1.detach(), F64, f"{name}: f' (differentiable)")
        assert_close(act.backward(g, z.detach()), g * d1.detach(), F64, f"{name}: f'")
        assert_close(act.grad2(z.detach()), d2, F64, f"{name}: f''")


@pytest.mark.parametrize("chunk", [1, 3, 8])
@pytest.mark.parametrize("opts", [dict(), dict(bias=True, activation="gelu"), dict(residual=True, bias=True, ln=True)],
                         ids=["plain", "bias-gelu", "ln-residual"])
def test_soft_gradient_clip_equals_naive(chunk, opts):
    """The soft clip u -> u / sqrt(1 + ||u||^2 / G^2) of every token's gradient, at a G where it
    binds: the chunked op (outputs, state, all gradients through the hand-written backward)
    equals the per-token autograd loop that clips the gradient tensors themselves."""
    opts = resolve({**opts, "max_grad_norm": 0.8}, 2, 4, chunk)
    args = make_inputs(40 + chunk, b=1, t=13, depth=2, bias=opts.get("bias", False))
    leaves = [*args[:6], *args[6], *(opts["ln"] if "ln" in opts else ())]
    for x in leaves:
        x.requires_grad_()
    w = torch.randn(1, 13, 2, 4, generator=torch.Generator().manual_seed(chunk), dtype=F64)
    outs, grads = [], []
    for fn in (titans_memory, titans_memory_naive):
        o, s = fn(*args, chunk_size=chunk, output_final_state=True, **opts)
        outs.append((o, s))
        loss = (o * w).sum() + sum((x * x).sum() for x in (*s.weights, *s.momentum))
        grads.append(torch.autograd.grad(loss, leaves))
    assert_close(outs[0][0], outs[1][0], F64)
    assert_states_close(outs[0][1], outs[1][1])
    for i, (a, b) in enumerate(zip(*grads)):
        assert_close(a, b, F64, f"leaf {i}")
    # the clip changed the result (it binds at this G)
    o_free, _ = titans_memory(*args, chunk_size=chunk, **{k: v for k, v in opts.items() if k != "max_grad_norm"})
    assert (o_free - outs[0][0]).abs().max() > 1e-2


def test_soft_clip_bounds_every_written_gradient():
    """||s_i u_i|| < G for every token, whatever the error's size (v scaled by 1e6)."""
    from seqzoo.ops.titans_chunk import Options, grad_norm_sq, key_pass

    q, k, v, *_ , weights = make_inputs(9, t=12, depth=2, bias=True)
    kh, vh = (x.transpose(1, 2) for x in (k, v))  # (B, H, T, d)
    for scale in (1.0, 1e3, 1e6):
        kp = key_pass(kh, vh * scale, weights, Options(bias=True, max_grad_norm=0.5), None)
        written = grad_norm_sq(kp.inputs, kp.deltas).sqrt()
        assert (written < 0.5).all()
        raw = grad_norm_sq(kp.inputs, kp.raw).sqrt()
        assert torch.allclose(written, raw / torch.sqrt(1 + raw ** 2 / 0.25))
