"""TTT (Sun et al. 2024) on the Titans engine: against flash-linear-attention's pure-PyTorch
``chunk_ttt_linear_ref`` (an external oracle, skipped when fla is absent) and against the
paper's primal mini-batch GD written out with autograd.

Convention map, fla -> seqzoo.ops.titans.titans_memory:
* fla's loss is 1/2 ||f(k) - v||^2 (its gradient g = f(k) - v), ours has no 1/2: theta = eta / 2.
* fla scales the sum of a mini-batch's gradients at row t by eta_t (and the mini-batch end by
  the last eta); the paper and ours weight gradient s by eta_s. They agree when eta is
  constant inside each mini-batch, which is what the oracle test feeds. fla builds in no
  1/(i+1) position factor.
* fla multiplies q by ``scale`` (default K^-1/2) before the read-out: we pass q * scale.
* inner model f(x) = x + LN(x W + b): ours with residual=True, bias=True (b is the last row of
  the weight), ln=(w, b) of fla, ln_eps=eps; momentum eta = 0 and forgetting alpha = 0.
* fla's read-out is z + LN(z) with z = q W_t + b_t (residual on z), ours is the paper's
  f(q) = q + LN(z); the test recovers z from fla's output and checks LN(z) against ours.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from seqzoo.ops.titans import titans_memory
from tests.helpers import assert_close

F64 = torch.float64


@functools.lru_cache(maxsize=None)
def _fla_ttt_naive():
    """fla's ``fla/ops/ttt/naive.py`` (it imports only torch). Loaded from its file: importing
    the ``fla`` package itself pulls in every Triton kernel (tens of seconds on CPU)."""
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("flash-linear-attention is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "ops" / "ttt" / "naive.py"
    if not path.is_file():
        pytest.skip(f"this flash-linear-attention has no {path.name} for TTT")
    module_spec = importlib.util.spec_from_file_location("_fla_ttt_naive", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _ttt_inputs(seed: int, b: int, t: int, h: int, d: int, mini_batch: int):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, t, h, d, generator=g, dtype=F64) for _ in range(3))
    # eta constant inside each mini-batch (where fla's and the paper's conventions agree)
    per_batch = 0.5 * torch.rand(b, -(-t // mini_batch), h, generator=g, dtype=F64) / d
    eta = per_batch.repeat_interleave(mini_batch, dim=1)[:, :t]  # (B, T, H)
    ln_w = 1 + 0.2 * torch.randn(h, d, generator=g, dtype=F64)
    ln_b = 0.2 * torch.randn(h, d, generator=g, dtype=F64)
    w0 = 0.3 * torch.randn(b, h, d, d, generator=g, dtype=F64)
    b0 = 0.3 * torch.randn(b, h, 1, d, generator=g, dtype=F64)
    return q, k, v, eta, ln_w, ln_b, w0, b0


def _layer_norm(x, w, b, eps):
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


@given(mini_batch=st.sampled_from([1, 2, 4, 8, 16]), n_batches=st.integers(1, 3), ragged=st.integers(0, 3),
       seed=st.integers(0, 2**16))
def test_ttt_linear_equals_fla_reference(mini_batch, n_batches, ragged, seed):
    naive = _fla_ttt_naive()
    b, h, d, eps = 2, 2, 8, 1e-6
    t = max(1, n_batches * mini_batch - ragged)
    q, k, v, eta, ln_w, ln_b, w0, b0 = _ttt_inputs(seed, b, t, h, d, mini_batch)
    scale = d ** -0.5
    o_fla, w_fla, b_fla = naive.chunk_ttt_linear_ref(
        q.float(), k.float(), v.float(), ln_w.float(), ln_b.float(), eta[..., None].float(), scale=scale, eps=eps,
        mini_batch_size=mini_batch, initial_state=w0.float().clone(), initial_state_bias=b0.float().clone(),
        output_final_state=True)
    zeros = torch.zeros_like(eta)
    o, state = titans_memory(q * scale, k, v, eta / 2, zeros, zeros, [torch.cat([w0, b0], 2)], chunk_size=mini_batch,
                             read="token", output_final_state=True, residual=True, bias=True, ln=(ln_w, ln_b),
                             ln_eps=eps)
    ours_ln = (o - q * scale).float()  # LN(z) with ln (w, b)
    z = o_fla - ours_ln                # fla's read-out is z + LN(z)
    assert_close(ours_ln, _layer_norm(z, ln_w.float()[:, None].transpose(0, 1), ln_b.float()[:, None].transpose(0, 1), eps),
                 torch.float32, "LN(z) of fla's read-out")
    if t % mini_batch == 0:  # fla's padding tokens write into its final bias
        assert_close(state.weights[0][..., :d, :].float(), w_fla, torch.float32, "final W")
        assert_close(state.weights[0][..., d:, :].float(), b_fla, torch.float32, "final b")


def _primal_ttt_mlp(q, k, v, eta, weights, ln, mini_batch, eps):
    """The paper's mini-batch GD in primal form for f(x) = x + LN(MLP_GELU(x)), with a
    plain autograd gradient per token at the mini-batch's first weights."""
    w1, b1, w2, b2 = weights  # per head: (H, K, 4K), (H, 4K), (H, 4K, K), (H, K)

    def f(x, w1, b1, w2, b2):  # x: (H, K)
        hid = F.gelu(torch.einsum("hk,hkm->hm", x, w1) + b1, approximate="tanh")
        z = torch.einsum("hm,hmk->hk", hid, w2) + b2
        return x + _layer_norm(z, ln[0], ln[1], eps)

    params = [p.clone() for p in weights]
    ys = []
    for start in range(0, q.shape[0], mini_batch):
        anchor = [p.detach().requires_grad_() for p in params]
        acc = [torch.zeros_like(p) for p in params]
        for t in range(start, min(start + mini_batch, q.shape[0])):
            loss = 0.5 * (f(k[t], *anchor) - v[t]).pow(2).sum(-1)  # (H,)
            grads = torch.autograd.grad((loss * eta[t]).sum(), anchor)  # eta_t per head
            acc = [a + g_ for a, g_ in zip(acc, grads)]
            ys.append(f(q[t], *[p - a for p, a in zip(params, acc)]))
        params = [p - a for p, a in zip(params, acc)]
    return torch.stack(ys)


def test_ttt_mlp_dual_form_equals_primal():
    """TTT-MLP (two GELU layers, 4x hidden, LN + residual): the engine's dual form equals the
    primal mini-batch GD of the paper, ragged T (fp64)."""
    g = torch.Generator().manual_seed(0)
    t, h, d, mb, eps = 11, 2, 4, 4, 1e-6
    q, k, v = (torch.randn(t, h, d, generator=g, dtype=F64) for _ in range(3))
    eta = 0.3 * torch.rand(t, h, generator=g, dtype=F64)
    w1, w2 = 0.3 * torch.randn(h, d, 4 * d, generator=g, dtype=F64), 0.3 * torch.randn(h, 4 * d, d, generator=g, dtype=F64)
    b1, b2 = 0.1 * torch.randn(h, 4 * d, generator=g, dtype=F64), 0.1 * torch.randn(h, d, generator=g, dtype=F64)
    ln = (1 + 0.2 * torch.randn(h, d, generator=g, dtype=F64), 0.2 * torch.randn(h, d, generator=g, dtype=F64))
    expected = _primal_ttt_mlp(q, k, v, eta, [w1, b1, w2, b2], ln, mb, eps)
    weights = [torch.cat([w1, b1[:, None]], 1)[None], torch.cat([w2, b2[:, None]], 1)[None]]  # (1, H, d_in + 1, d_out)
    zeros = torch.zeros(1, t, h, dtype=F64)
    o, _ = titans_memory(q[None], k[None], v[None], eta[None] / 2, zeros, zeros, weights, chunk_size=mb,
                         activation="gelu_tanh", residual=True, bias=True, ln=ln, ln_eps=eps)
    assert_close(o[0], expected, F64)
