"""One chunk of the Titans neural memory (Behrouz, Zhong & Mirrokni 2024, section 3): the
forward maths and its hand-derived backward, free of nn.Module. ``seqzoo.ops.titans`` runs
them over a sequence; read its docstring first.

Per chunk (gradients at the chunk-start weights, eq. 16-18), with a_j = 1 - alpha_j,
A_t = prod_{j<=t} a_j, E_t = prod_{j<=t} eta_j, from weights M_0 and momentum S_0:

    M_t = A_t M_0 + B_t S_0 - sum_{i<=t} C_ti u_i,    B_t = sum_{s<=t} (A_t/A_s) E_s,
    C_ti = theta_i sum_{s=i..t} (A_t/A_s)(E_s/E_i),  S_t = E_t S_0 - sum_{i<=t} D_ti u_i,
    D_ti = theta_i E_t/E_i                              (lower triangular, built in log space).

The gradient of layer l for token i is an outer product hk_i^T delta_i (the layer's input
times its output-side delta, from one forward+backward of the MLP at the chunk-start
weights over the whole chunk), so the pre-activation of layer l for query t is

    z_t = A_t (h_t W_0) + B_t (h_t S_0) - sum_i C_ti (h_t . hk_i) delta_i
        = ``A * (H W0) + B * (H S0) - (C ⊙ H Hk^T) Delta``

-- matmuls layer by layer, no per-token weight tensor -- and the state at the chunk's last
token r is W_r = A_r W_0 + B_r S_0 - Hk^T diag(C_r) Delta, S_r = E_r S_0 - Hk^T diag(D_r) Delta.

Backward (``chunk_backward``). Autograd through the formulas above spends most of its time
on weight-sized element-wise products (the scalings A_r W_0, B_r S_0 and their gradients).
The hand-written VJP below keeps every weight-sized term inside a GEMM or one fused pass,
and reduces the gate gradients of weight-sized products to dot products:

    read:    R = dz W_0^T, U = dz S_0^T;  dA_t += <R_t, h_t>,  dB_t += <U_t, h_t>,
             dh += A ⊙ R + B ⊙ U + (dG ⊙ C) Hk,  dG = -dz Delta^T,  dC += dG ⊙ (H Hk^T),
             dHk += (dG ⊙ C)^T H,  dDelta += -(C ⊙ H Hk^T)^T dz,
             dW_0 += H^T (A ⊙ dz),  dS_0 += H^T (B ⊙ dz);
    state:   dW_0 += A_r dW_r,  dS_0 += B_r dW_r + E_r dS_r,  dA_r += <dW_r, W_0>, ...,
             dC_r,i = -<(Hk dW_r)_i, delta_i>,  dDelta += -C_r ⊙ (Hk dW_r),
             dHk += -(C_r ⊙ Delta) dW_r^T   (and the same with D_r, dS_r).

The small parts -- the gates (n x n) and the forward+backward of the MLP on the keys that
produces Hk and Delta -- are recomputed under autograd and differentiated by it: they cost
a few activation-sized matmuls and need second derivatives of the activation and of the
optional LayerNorm, which autograd gets right for free.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

Weights = tuple[Tensor, ...]


class TitansState(NamedTuple):
    """Memory state after some tokens. Each field but ``pos`` holds one (B, H, d_in, d_out)
    tensor per layer (d_in + 1 rows with ``bias=True``)."""

    start: Weights      # weights at the start of the current chunk: gradients are taken here
    weights: Weights    # current weights M_t
    momentum: Weights   # current momentum S_t
    pos: int            # tokens of the current chunk already consumed, 0 <= pos < chunk_size


class Options(NamedTuple):
    """The memory's static settings (see ``seqzoo.ops.titans.titans_memory``)."""

    activation: str = "silu"
    read: str = "token"
    residual: bool = False
    bias: bool = False
    ln_eps: float = 1e-6
    no_momentum: bool = False    # eta == 0 everywhere: B = 0 and S_t = -theta_t u_t
    no_forgetting: bool = False  # alpha == 0 everywhere: A = 1


# -- activations and their derivatives (needed for the closed-form deltas) ----------------
def _silu_grad(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def _gelu_grad(z: Tensor) -> Tensor:
    cdf = 0.5 * (1 + torch.erf(z * 2 ** -0.5))
    return cdf + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def _gelu_tanh_grad(z: Tensor) -> Tensor:
    c = math.sqrt(2 / math.pi)
    th = torch.tanh(c * (z + 0.044715 * z ** 3))
    return 0.5 * (1 + th) + 0.5 * z * (1 - th * th) * c * (1 + 3 * 0.044715 * z * z)


ACTIVATIONS: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]] = {
    "silu": (F.silu, _silu_grad),
    "gelu": (F.gelu, _gelu_grad),
    "gelu_tanh": (lambda z: F.gelu(z, approximate="tanh"), _gelu_tanh_grad),
    "relu": (F.relu, lambda z: (z > 0).to(z.dtype)),
    "identity": (lambda z: z, torch.ones_like),
}


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {activation!r}")


def _with_one(h: Tensor) -> Tensor:
    """Append the constant-1 input that carries a layer's bias."""
    return torch.cat([h, h.new_ones(*h.shape[:-1], 1)], dim=-1)


def _layer_norm(z: Tensor, ln: tuple[Tensor, Tensor], eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm over the last dim with (H, V) affine params; returns (y, x_hat, 1/sigma)."""
    mu = z.mean(-1, keepdim=True)
    var = (z - mu).pow(2).mean(-1, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    x_hat = (z - mu) * rstd
    weight, bias = (rearrange(p, "h v -> h 1 v").to(z.dtype) for p in ln)  # (H, 1, V)
    return x_hat * weight + bias, x_hat, rstd


def _layer_norm_backward(g: Tensor, x_hat: Tensor, rstd: Tensor, weight: Tensor) -> Tensor:
    g = g * rearrange(weight, "h v -> h 1 v").to(g.dtype)  # (B, H, n, V)
    return rstd * (g - g.mean(-1, keepdim=True) - x_hat * (g * x_hat).mean(-1, keepdim=True))


def mlp(h: Tensor, weights: Sequence[Tensor], *, activation: str, residual: bool, bias: bool,
        ln: tuple[Tensor, Tensor] | None, ln_eps: float) -> Tensor:
    """M(h) for h: (B, H, n, d_0) with per-layer weights (B, H, d_in[+1], d_out)."""
    act = ACTIVATIONS[activation][0]
    x = h
    for layer, w in enumerate(weights):
        z = (_with_one(h) if bias else h) @ w  # (B, H, n, d_out)
        h = act(z) if layer < len(weights) - 1 else z
    if ln is not None:
        h = _layer_norm(h, ln, ln_eps)[0]
    return x + h if residual else h


# -- gates -------------------------------------------------------------------------------
def _segsum(x: Tensor) -> Tensor:
    """x: (..., n) -> (..., n, n) with out[t, s] = sum_{j=s+1..t} x_j for s <= t, -inf above.
    Masked cumsum rather than a difference of cumsums: exact with x_j = log 0 and in fp32."""
    n = x.shape[-1]
    xx = x[..., :, None].expand(*x.shape, n)  # (..., n, n): xx[j, s] = x_j
    lower = torch.ones(n, n, dtype=torch.bool, device=x.device)
    xx = xx.masked_fill(~torch.tril(lower, diagonal=-1), 0.0)
    out = torch.cumsum(xx, dim=-2)
    return out.masked_fill(~torch.tril(lower), float("-inf"))


class Gates(NamedTuple):
    a: Tensor     # (..., n)     A_t = prod_{j<=t} (1 - alpha_j)
    b: Tensor     # (..., n)     B_t = sum_{s<=t} (A_t/A_s) E_s
    c: Tensor     # (..., n, n)  C_ti = theta_i sum_{s=i..t} (A_t/A_s)(E_s/E_i)
    e: Tensor     # (..., n)     E_t = prod_{j<=t} eta_j
    d: Tensor     # (..., n, n)  D_ti = theta_i E_t/E_i   (momentum: S_t = E_t S_0 - sum_i D_ti u_i)


def safe_log(x: Tensor) -> Tensor:
    # log 0 = -inf would give 0 * inf = nan in backward; the smallest normal is exact enough
    # (its powers underflow to 0 like the true products).
    return torch.log(x.clamp_min(torch.finfo(x.dtype).tiny))


def log_gates(theta: Tensor, eta: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(theta, log(1 - alpha), log eta) in a float type of at least 32 bits."""
    dtype = torch.promote_types(theta.dtype, torch.float32)
    return theta.to(dtype), safe_log(1 - alpha.to(dtype)), safe_log(eta.to(dtype))


def gates(theta: Tensor, log_a: Tensor, log_e: Tensor) -> Gates:
    """All inputs (..., n) in a float type of at least 32 bits."""
    decay = torch.exp(_segsum(log_a))  # (..., n, n) A_t / A_s
    mom = torch.exp(_segsum(log_e))    # (..., n, n) E_s / E_i
    a = torch.exp(torch.cumsum(log_a, -1))
    e = torch.exp(torch.cumsum(log_e, -1))
    b = (decay @ e[..., None])[..., 0]
    theta_cols = theta[..., None, :]
    return Gates(a, b, (decay @ mom) * theta_cols, e, mom * theta_cols)


def _sub_matmul(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """x - a @ b for (B, H, ., .) tensors, the subtraction fused into the GEMM."""
    out = torch.baddbmm(x.flatten(0, 1), a.flatten(0, 1), b.flatten(0, 1), alpha=-1)  # (B*H, d_in, d_out)
    return out.view(x.shape)


def _add_matmul(x: Tensor | None, a: Tensor, b: Tensor) -> Tensor:
    """x + a @ b (just a @ b when x is None), the addition fused into the GEMM."""
    if x is None:
        return a @ b
    out = torch.baddbmm(x.flatten(0, 1), a.flatten(0, 1), b.flatten(0, 1))  # (B*H, ., .)
    return out.view(x.shape)


def _dot(x: Tensor, y: Tensor) -> Tensor:
    """<x, y> over the last two dims of (B, H, i, j) tensors: (B, H). (einsum reduces without
    a weight-sized temporary; a (1, n) @ (n, 1) bmm is a slow single-threaded GEMV on CPU.)"""
    return torch.einsum("bhij,bhij->bh", x, y)


def _acc(x: Tensor | None, y: Tensor) -> Tensor:
    return y if x is None else x + y


# -- forward ------------------------------------------------------------------------------
def key_pass(k: Tensor, v: Tensor, start: Weights, opts: Options,
             ln: tuple[Tensor, Tensor] | None) -> tuple[list[Tensor], list[Tensor]]:
    """Forward + backward of M at the chunk-start weights on the keys: per layer its input
    hk (B, H, n, d_in[+1]) and output-side delta (B, H, n, d_out); the gradient of layer l
    for token i is hk_i^T delta_i."""
    act, act_grad = ACTIVATIONS[opts.activation]
    n_layers = len(start)
    inputs, pre = [], []
    h = k
    for layer, w in enumerate(start):
        h_in = _with_one(h) if opts.bias else h  # (B, H, n, d_in)
        inputs.append(h_in)
        z = h_in @ w
        pre.append(z)
        h = act(z) if layer < n_layers - 1 else z
    out = h
    if ln is not None:
        out, x_hat, rstd = _layer_norm(h, ln, opts.ln_eps)
    if opts.residual:
        out = out + k
    delta = 2 * (out - v)  # d||M(k) - v||^2 / d out, summed over V (no 1/2)
    if ln is not None:
        delta = _layer_norm_backward(delta, x_hat, rstd, ln[0])
    deltas = [delta]
    for layer in range(n_layers - 1, 0, -1):
        w = start[layer]
        w = w[..., :-1, :] if opts.bias else w  # the bias row has no input to send a delta to
        delta = (delta @ w.transpose(-1, -2)) * act_grad(pre[layer - 1])
        deltas.append(delta)
    deltas.reverse()
    return inputs, deltas


def read_token(q: Tensor, inputs: Sequence[Tensor], deltas: Sequence[Tensor], g: Gates, state: TitansState,
               opts: Options, ln: tuple[Tensor, Tensor] | None) -> tuple[Tensor, list[Tensor]]:
    """y_t = M_t(q_t) for every token of a chunk, layer by layer; q: (B, H, n, K), gates
    already in q's dtype. Returns y (B, H, n, V) and each layer's pre-activations z_l."""
    act = ACTIVATIONS[opts.activation][0]
    n_layers = len(state.weights)
    h, pre_q = q, []
    for layer in range(n_layers):
        h_in = _with_one(h) if opts.bias else h
        w0, s0 = state.weights[layer], state.momentum[layer]
        gram = (h_in @ inputs[layer].transpose(-1, -2)) * g.c  # (B, H, n, n) C_ti (h_t . hk_i)
        z = h_in @ w0 if opts.no_forgetting else g.a[..., None] * (h_in @ w0)
        if not opts.no_momentum:
            z = torch.addcmul(z, g.b[..., None], h_in @ s0)
        z = _sub_matmul(z, gram, deltas[layer])
        pre_q.append(z)
        h = act(z) if layer < n_layers - 1 else z
    if ln is not None:
        h = _layer_norm(h, ln, opts.ln_eps)[0]
    return (q + h if opts.residual else h), pre_q


def update(inputs: Sequence[Tensor], deltas: Sequence[Tensor], g: Gates, state: TitansState, *, last: int,
           closes: bool, opts: Options) -> TitansState:
    """The state after token ``last`` of the chunk, in closed form (gates in the weights' dtype):
    W_r = A_r W_0 + B_r S_0 - Hk^T diag(C_r) Delta,  S_r = E_r S_0 - Hk^T diag(D_r) Delta."""
    a_r, b_r, e_r = (x[..., last, None, None] for x in (g.a, g.b, g.e))  # (B, H, 1, 1)
    c_r, d_r = g.c[..., last, :, None], g.d[..., last, :, None]       # (B, H, n, 1)
    new_w, new_s = [], []
    for layer, (hk, delta) in enumerate(zip(inputs, deltas)):
        hk_t = hk.transpose(-1, -2)  # (B, H, d_in, n)
        w0, s0 = state.weights[layer], state.momentum[layer]
        # Fused multiply-adds: these weight-sized passes cost as much as the matmuls on CPU.
        w_carried = w0 if opts.no_forgetting else a_r * w0
        if opts.no_momentum:  # S_r = -theta_r u_r: one outer product
            new_w.append(_sub_matmul(w_carried, hk_t, c_r * delta))
            d_rr = g.d[..., last, last, None, None]
            new_s.append(-(hk_t[..., last:last + 1] @ (d_rr * delta[..., last:last + 1, :])))
        else:
            new_w.append(_sub_matmul(torch.addcmul(w_carried, b_r, s0), hk_t, c_r * delta))
            new_s.append(_sub_matmul(e_r * s0, hk_t, d_r * delta))
    new_w, new_s = tuple(new_w), tuple(new_s)
    if closes:
        return TitansState(new_w, new_w, new_s, 0)
    return TitansState(state.start, new_w, new_s, state.pos + last + 1)


def chunk_forward(q: Tensor, k: Tensor, v: Tensor, g: Gates, state: TitansState, *, last: int,
                  closes: bool, opts: Options, ln: tuple[Tensor, Tensor] | None) -> tuple[Tensor, TitansState]:
    """Tokens pos..pos+n-1 of one chunk. q, k: (B, H, n, K), v: (B, H, n, V); gates (B, H, n[, n]).
    ``last``: index of the last real token (tokens after it are padding); ``closes``: the chunk
    ends here, so the new weights become the next chunk-start weights.
    Returns the read-out (B, H, n, V) and the state after token ``last``."""
    inputs, deltas = key_pass(k, v, state.start, opts, ln)
    g = Gates(*(x.to(q.dtype) for x in g))
    if opts.read == "token":
        y = read_token(q, inputs, deltas, g, state, opts, ln)[0]
    else:
        y = mlp(q, state.start, activation=opts.activation, residual=opts.residual, bias=opts.bias,
                ln=ln, ln_eps=opts.ln_eps)
    return y, update(inputs, deltas, g, state, last=last, closes=closes, opts=opts)


# -- backward -----------------------------------------------------------------------------
class ChunkGrads(NamedTuple):
    """Gradients of one chunk's read-out and state update with respect to its operands."""

    q: Tensor | None                        # (B, H, n, K), through the token read-out
    gates: Gates                            # entries None where zero
    inputs: list[Tensor | None]             # per layer, the key-side inputs hk
    deltas: list[Tensor | None]             # per layer, the deltas
    weights: list[Tensor | None]            # per layer, the weights the chunk started from
    momentum: list[Tensor | None]           # per layer, the momentum the chunk started from
    ln: tuple[Tensor | None, Tensor | None]  # through the token read-out's LayerNorm


def read_update_backward(q: Tensor, inputs: Sequence[Tensor], deltas: Sequence[Tensor], g: Gates,
                         state: TitansState, pre_q: Sequence[Tensor], *, last: int, opts: Options,
                         ln: tuple[Tensor, Tensor] | None, grad_y: Tensor | None,
                         grad_w: Sequence[Tensor | None], grad_s: Sequence[Tensor | None]) -> ChunkGrads:
    """VJP of ``read_token`` (when ``read="token"``) and ``update`` for one chunk of n real
    tokens, by hand (formulas in the module docstring). ``grad_y`` (B, H, n, V) and
    ``grad_w`` / ``grad_s`` (per layer) are the gradients of the read-out and of the state
    after the chunk (None: zero); gates in q's dtype, without graph."""
    act, act_grad = ACTIVATIONS[opts.activation]
    n_layers, n = len(state.weights), q.shape[2]
    d_a = d_b = d_c = d_e = d_d = None
    d_hk: list[Tensor | None] = [None] * n_layers
    d_delta: list[Tensor | None] = [None] * n_layers
    d_w0: list[Tensor | None] = [None] * n_layers
    d_s0: list[Tensor | None] = [None] * n_layers
    d_q = None
    d_ln: tuple[Tensor | None, Tensor | None] = (None, None)

    if opts.read == "token" and grad_y is not None:
        hq = [q] + [act(z) for z in pre_q[:-1]]  # each layer's input on the query path
        dz = grad_y
        if opts.residual:
            d_q = grad_y
        if ln is not None:
            _, x_hat, rstd = _layer_norm(pre_q[-1], ln, opts.ln_eps)
            d_ln = ((grad_y * x_hat).sum((0, 2)), grad_y.sum((0, 2)))  # (H, V) each
            dz = _layer_norm_backward(grad_y, x_hat, rstd, ln[0])
        for layer in reversed(range(n_layers)):
            h_in = _with_one(hq[layer]) if opts.bias else hq[layer]  # (B, H, n, d_in)
            h_t = h_in.transpose(-1, -2)
            w0, s0 = state.weights[layer], state.momentum[layer]
            hk, delta = inputs[layer], deltas[layer]
            dh = dz @ w0.transpose(-1, -2)  # (B, H, n, d_in)  R = dz W0^T
            if opts.no_forgetting:
                d_w0[layer] = h_t @ dz
            else:
                d_a = _acc(d_a, (dh * h_in).sum(-1))  # dA_t = <R_t, h_t> = <dz_t, (h W0)_t>
                dh.mul_(g.a[..., None])
                d_w0[layer] = h_t @ (g.a[..., None] * dz)
            if not opts.no_momentum:
                u = dz @ s0.transpose(-1, -2)  # (B, H, n, d_in)  U = dz S0^T
                d_b = _acc(d_b, (u * h_in).sum(-1))
                dh.addcmul_(g.b[..., None], u)
                d_s0[layer] = h_t @ (g.b[..., None] * dz)
            gram = h_in @ hk.transpose(-1, -2)  # (B, H, n, n)  h_t . hk_i
            d_gram = -(dz @ delta.transpose(-1, -2))  # (B, H, n, n)  d/d(C ⊙ gram)
            d_c = _acc(d_c, d_gram * gram)
            d_gram.mul_(g.c)
            dh = _add_matmul(dh, d_gram, hk)
            d_hk[layer] = _acc(d_hk[layer], d_gram.transpose(-1, -2) @ h_in)
            d_delta[layer] = _sub_matmul(d_delta[layer], gram.mul_(g.c).transpose(-1, -2), dz) \
                if d_delta[layer] is not None else -(gram.mul_(g.c).transpose(-1, -2) @ dz)
            if opts.bias:
                dh = dh[..., :-1]
            if layer > 0:
                dz = dh * act_grad(pre_q[layer - 1])
            else:
                d_q = _acc(d_q, dh)

    # the state at the last token r
    row = torch.zeros(n, dtype=q.dtype, device=q.device)
    row[last] = 1  # scatters a gradient of a row-r gate back into its (n,) / (n, n) gate
    for layer in range(n_layers):
        gw, gs = grad_w[layer], grad_s[layer]
        w0, s0 = state.weights[layer], state.momentum[layer]
        hk, delta = inputs[layer], deltas[layer]
        if gw is not None:
            c_r = g.c[..., last, :, None]  # (B, H, n, 1)
            if opts.no_forgetting:
                d_w0[layer] = _acc(d_w0[layer], gw)
            else:
                a_r = g.a[..., last, None, None]  # (B, H, 1, 1)
                d_w0[layer] = gw * a_r if d_w0[layer] is None else d_w0[layer].addcmul_(gw, a_r)
                d_a = _acc(d_a, _dot(gw, w0)[..., None] * row)
            if not opts.no_momentum:
                b_r = g.b[..., last, None, None]
                d_s0[layer] = gw * b_r if d_s0[layer] is None else d_s0[layer].addcmul_(gw, b_r)
                d_b = _acc(d_b, _dot(gw, s0)[..., None] * row)
            m = hk @ gw  # (B, H, n, d_out)
            d_c = _acc(d_c, -(m * delta).sum(-1)[..., None, :] * row[:, None])  # row r of C
            d_delta[layer] = _acc(d_delta[layer], -(c_r * m))
            d_hk[layer] = _sub_matmul(d_hk[layer], c_r * delta, gw.transpose(-1, -2)) if d_hk[layer] is not None \
                else -((c_r * delta) @ gw.transpose(-1, -2))
        if gs is None:
            continue
        if opts.no_momentum:  # S_r = -D_rr hk_r^T delta_r
            d_rr = g.d[..., last, last, None, None]  # (B, H, 1, 1)
            m = hk[..., last:, :] @ gs  # (B, H, 1, d_out)
            dd = torch.zeros_like(g.d)
            dd[..., last, last] = -(m[..., 0, :] * delta[..., last, :]).sum(-1)
            d_d = _acc(d_d, dd)
            dl = torch.zeros_like(delta)
            dl[..., last:, :] = -(d_rr * m)
            d_delta[layer] = _acc(d_delta[layer], dl)
            dh = torch.zeros_like(hk)
            dh[..., last:, :] = -((d_rr * delta[..., last:, :]) @ gs.transpose(-1, -2))
            d_hk[layer] = _acc(d_hk[layer], dh)
        else:
            d_r = g.d[..., last, :, None]  # (B, H, n, 1)
            e_r = g.e[..., last, None, None]
            d_s0[layer] = gs * e_r if d_s0[layer] is None else d_s0[layer].addcmul_(gs, e_r)
            d_e = _acc(d_e, _dot(gs, s0)[..., None] * row)
            m = hk @ gs
            d_d = _acc(d_d, -(m * delta).sum(-1)[..., None, :] * row[:, None])
            d_delta[layer] = _acc(d_delta[layer], -(d_r * m))
            d_hk[layer] = _sub_matmul(d_hk[layer], d_r * delta, gs.transpose(-1, -2)) if d_hk[layer] is not None \
                else -((d_r * delta) @ gs.transpose(-1, -2))
    return ChunkGrads(d_q, Gates(d_a, d_b, d_c, d_e, d_d), d_hk, d_delta, d_w0, d_s0, d_ln)
