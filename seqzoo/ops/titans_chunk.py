"""One chunk of the Titans neural memory (Behrouz, Zhong & Mirrokni 2024, section 3): its
forward maths and their hand-derived backward, free of nn.Module. ``seqzoo.ops.titans``
runs them over a sequence; read its docstring first.

Layout. Per layer the memory's weights W and momentum S sit side by side in one tensor
X = [W | S] of shape (B, H, d_in, 2 d_out), so that every product with both is one GEMM.

Per chunk (gradients at the chunk-start weights W_s, eq. 16-18), with a_j = 1 - alpha_j,
A_t = prod_{j<=t} a_j, E_t = prod_{j<=t} eta_j, from X_0 = [W_0 | S_0]:

    M_t = A_t W_0 + B_t S_0 - sum_{i<=t} C_ti u_i,    B_t = sum_{s<=t} (A_t/A_s) E_s,
    C_ti = theta_i sum_{s=i..t} (A_t/A_s)(E_s/E_i),  S_t = E_t S_0 - sum_{i<=t} D_ti u_i,
    D_ti = theta_i E_t/E_i                              (lower triangular, built in log space).

The gradient of layer l for key i is an outer product hk_i^T delta_i (the layer's input
times its output-side delta, from one forward+backward of the MLP at W_s over the whole
chunk: the *key pass*). So the pre-activation of layer l for query t is

    z_t = A_t P_t + B_t Q_t - sum_i C_ti (h_t . hk_i) delta_i,     [P | Q] = h X_0,

matmuls layer by layer, no per-token weight tensor, and the state at the chunk's last
token r is X_r = [A_r W_0 + B_r S_0 | E_r S_0] - Hk^T [diag(C_r) Delta | diag(D_r) Delta].

Backward. Autograd through these formulas spends much of its time on weight-sized
element-wise products (the gate scalings of W_0 and S_0 and their gradients). The VJP
below keeps every weight-sized term inside a GEMM or one fused pass and reduces the gate
gradients of weight-sized products to dot products. With dX_r = [dW_r | dS_r] the gradient
of the state after the chunk and dz the gradient of a read-out pre-activation:

    state:  [m | m'] = Hk dX_r,  dC_r,i = -<m_i, delta_i>,  dD_r,i = -<m'_i, delta_i>,
            dDelta += -(C_r ⊙ m + D_r ⊙ m'),  dHk += -[C_r ⊙ Delta | D_r ⊙ Delta] dX_r^T,
            dX_0 = [A_r dW_r | B_r dW_r + E_r dS_r],
            dA_r = <dW_r, W_0>,  dB_r = <dW_r, S_0>,  dE_r = <dS_r, S_0>;
    read:   dA_t += <dz_t, P_t>,  dB_t += <dz_t, Q_t>,  dX_0 += h^T [A ⊙ dz | B ⊙ dz],
            dh = [A ⊙ dz | B ⊙ dz] X_0^T + (dG ⊙ C) Hk,  dG = -dz Delta^T,
            dC += dG ⊙ (h Hk^T),  dHk += (dG ⊙ C)^T h,  dDelta += -(C ⊙ h Hk^T)^T dz;
    key pass (delta_l = (delta_{l+1} W_{l+1}^T) ⊙ f'(z_l), delta_L = 2 (M(k) - v)): its
            VJP needs f'' of the activation (``titans_math.ACTIVATIONS``). With the optional
            outer LayerNorm, delta_L = r P(g ⊙ w) with g = 2 (M(k) - v), x̂ = (z - mu) r the
            normalised z = z_L, r = 1/sigma and P(a) = a - mean(a) - x̂ mean(a ⊙ x̂) (self-adjoint);
            for the incoming e = d delta_L (``ln_top_backward``):
            d(g ⊙ w) = r P(e),  dr = <e, delta_L> / r,  dx̂ = -r (mean(a ⊙ x̂) e + a mean(e ⊙ x̂))
            + 2 d g ⊙ w (the output LN(z) = x̂ ⊙ w + b inside g), and dz = r (dx̂ - mean(dx̂)
            - x̂ mean(dx̂ ⊙ x̂)) - dr r^2 x̂ / V (V the output width; dr/dz = -r^2 x̂ / V).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from einops import rearrange
from torch import Tensor

from seqzoo.ops.titans_math import (
    ACTIVATIONS,
    Gates,
    acc,
    addmm_,
    dot,
    layer_norm,
    layer_norm_backward,
    with_one,
)


class Options(NamedTuple):
    """The memory's static settings (see ``seqzoo.ops.titans.titans_memory``)."""

    activation: str = "silu"
    read: str = "token"
    residual: bool = False
    bias: bool = False
    ln_eps: float = 1e-6
    no_momentum: bool = False    # eta == 0 everywhere: B = E = 0, S_t = -theta_t u_t
    no_forgetting: bool = False  # alpha == 0 everywhere: A = 1
    max_grad_norm: float | None = None  # soft clip of each token's gradient (``clip_scale``)


def halves(x: Tensor) -> tuple[Tensor, Tensor]:
    """[W | S] -> (W, S), two views."""
    d = x.shape[-1] // 2
    return x[..., :d], x[..., d:]


# -- forward ---------------------------------------------------------------------------------
class Trace(NamedTuple):
    """The memory MLP run on one chunk of inputs at fixed weights, kept for the backward."""

    inputs: list[Tensor]   # per layer its input h_{l-1} (with the constant 1 column if bias)
    pre: list[Tensor]      # per layer its pre-activation z_l
    out: Tensor            # M(h_0) before the residual (after the LayerNorm, if any)
    ln_stats: tuple[Tensor, Tensor] | None = None  # the LayerNorm's (x_hat, 1/sigma) of z_L


def trace_mlp(h: Tensor, weights: Sequence[Tensor], opts: Options, ln: tuple[Tensor, Tensor] | None) -> Trace:
    """Forward of the memory MLP keeping each layer's input and pre-activation."""
    act = ACTIVATIONS[opts.activation][0]
    inputs, pre = [], []
    for layer, w in enumerate(weights):
        h_in = with_one(h) if opts.bias else h  # (B, H, n, d_in)
        z = h_in @ w
        inputs.append(h_in)
        pre.append(z)
        h = act(z) if layer < len(weights) - 1 else z
    stats = None
    if ln is not None:
        h, x_hat, rstd = layer_norm(h, ln, opts.ln_eps)
        stats = (x_hat, rstd)
    return Trace(inputs, pre, h, stats)


class KeyPass(NamedTuple):
    """Forward + backward of M at the chunk-start weights on the keys: the gradient of layer
    l for key i is inputs[l]_i^T deltas[l]_i (after the soft clip, when there is one)."""

    trace: Trace
    mids: list[Tensor]     # per layer l < L-1: delta_{l+1} W_{l+1}^T, before the f'(z_l) factor
    deltas: list[Tensor]   # per layer: output-side delta (B, H, n, d_out), as written
    raw: list[Tensor] | None = None   # the deltas before the soft clip (None: no clip)
    scale: Tensor | None = None       # (B, H, n, 1) the clip factor s_i of each token

    @property
    def inputs(self) -> list[Tensor]:
        return self.trace.inputs


def key_pass(k: Tensor, v: Tensor, start: Sequence[Tensor], opts: Options,
             ln: tuple[Tensor, Tensor] | None) -> KeyPass:
    act = ACTIVATIONS[opts.activation]
    tr = trace_mlp(k, start, opts, ln)
    out = tr.out + k if opts.residual else tr.out
    delta = 2 * (out - v)  # d||M(k) - v||^2 / d out, summed over V (no 1/2)
    if ln is not None:
        delta = layer_norm_backward(delta, *tr.ln_stats, ln[0])
    deltas, mids = [delta], []
    for layer in range(len(start) - 1, 0, -1):
        w = start[layer][..., :-1, :] if opts.bias else start[layer]  # the bias row has no input
        mid = delta @ w.transpose(-1, -2)  # (B, H, n, d_{l-1})
        pre = tr.pre[layer - 1]
        # mid * f'(z); under autograd (the LayerNorm path) with differentiable ops
        delta = mid * act.grad(pre) if torch.is_grad_enabled() else act.backward(mid, pre)
        mids.append(mid)
        deltas.append(delta)
    mids.reverse()
    deltas.reverse()
    if opts.max_grad_norm is None:
        return KeyPass(tr, mids, deltas)
    scale = clip_scale(tr.inputs, deltas, opts.max_grad_norm)
    return KeyPass(tr, mids, [d * scale for d in deltas], deltas, scale)


def grad_norm_sq(inputs: Sequence[Tensor], deltas: Sequence[Tensor]) -> Tensor:
    """||u_i||^2 summed over layers, per token: (B, H, n, 1). Each layer's gradient is the
    outer product hk_i^T delta_i, whose squared Frobenius norm is ||hk_i||^2 ||delta_i||^2."""
    return sum(h.pow(2).sum(-1, keepdim=True) * d.pow(2).sum(-1, keepdim=True) for h, d in zip(inputs, deltas))


def clip_scale(inputs: Sequence[Tensor], deltas: Sequence[Tensor], max_norm: float) -> Tensor:
    """s_i = (1 + ||u_i||^2 / G^2)^(-1/2): ||s_i u_i|| < G always, s_i ~ 1 for ||u_i|| << G."""
    return torch.rsqrt(1 + grad_norm_sq(inputs, deltas) / max_norm ** 2)


def clip_backward(key: KeyPass, grad_inputs: list[Tensor | None], grad_deltas: list[Tensor | None],
                  max_norm: float) -> tuple[list[Tensor | None], list[Tensor | None]]:
    """VJP of the soft clip: from the gradients of the key pass inputs hk and of the written
    deltas s * delta, those of hk and of the raw deltas. With g = ||u||^2 and ds/dg = -s^3/(2 G^2),
    d delta_l = s d delta'_l + c ||hk_l||^2 delta_l and d hk_l += c ||delta_l||^2 hk_l, where
    c = -(s^3 / G^2) sum_l <d delta'_l, delta_l>."""
    s, raw = key.scale, key.raw
    ds = sum(((gd * d).sum(-1, keepdim=True) for gd, d in zip(grad_deltas, raw) if gd is not None),
             torch.zeros_like(s))
    c = ds.mul_(s.pow(3)).div_(-max_norm ** 2)  # (B, H, n, 1)
    new_inputs, new_deltas = [], []
    for h, d, gh, gd in zip(key.inputs, raw, grad_inputs, grad_deltas):
        gd_raw = d * (c * h.pow(2).sum(-1, keepdim=True))
        if gd is not None:
            gd_raw.addcmul_(gd, s)
        gh_extra = h * (c * d.pow(2).sum(-1, keepdim=True))
        new_deltas.append(gd_raw)
        new_inputs.append(gh_extra if gh is None else gh + gh_extra)
    return new_inputs, new_deltas


class Read(NamedTuple):
    """The token read-out of a chunk and what its backward needs."""

    y: Tensor            # (B, H, n, V)
    pq: list[Tensor]     # per layer [h W_0 | h S_0] (just h W_0 without momentum)
    pre: list[Tensor]    # per layer pre-activation z_l
    ln_stats: tuple[Tensor, Tensor] | None = None  # the LayerNorm's (x_hat, 1/sigma) of z_L


def read_token(q: Tensor, key: KeyPass, g: Gates, xs: Sequence[Tensor], opts: Options,
               ln: tuple[Tensor, Tensor] | None) -> Read:
    """y_t = M_t(q_t) for every token of the chunk, layer by layer (gates in q's dtype)."""
    act = ACTIVATIONS[opts.activation][0]
    h, pqs, pre = q, [], []
    for layer, x in enumerate(xs):
        h_in = with_one(h) if opts.bias else h  # (B, H, n, d_in)
        w, _ = halves(x)
        pq = h_in @ (w if opts.no_momentum else x)  # (B, H, n, 2 d_out): [P | Q]
        p, q_s = halves(pq) if not opts.no_momentum else (pq, None)
        z = p.clone() if opts.no_forgetting else p * g.a[..., None]
        if q_s is not None:
            z.addcmul_(q_s, g.b[..., None])
        gram = (h_in @ key.inputs[layer].transpose(-1, -2)).mul_(g.c)  # (B, H, n, n) C_ti (h_t . hk_i)
        addmm_(z, gram, key.deltas[layer], alpha=-1)
        pqs.append(pq)
        pre.append(z)
        h = act(z) if layer < len(xs) - 1 else z
    stats = None
    if ln is not None:
        h, x_hat, rstd = layer_norm(h, ln, opts.ln_eps)
        stats = (x_hat, rstd)
    return Read(q + h if opts.residual else h, pqs, pre, stats)


def _scaled_pair(delta: Tensor, c: Tensor, d: Tensor) -> Tensor:
    """[C ⊙ Delta | D ⊙ Delta]: (B, H, n, 2 d_out)."""
    out = delta.new_empty(*delta.shape[:-1], 2 * delta.shape[-1])
    left, right = halves(out)
    torch.mul(delta, c, out=left)
    torch.mul(delta, d, out=right)
    return out


def update(key: KeyPass, g: Gates, xs: Sequence[Tensor], *, last: int, opts: Options,
           out: Sequence[Tensor] | None = None) -> list[Tensor]:
    """[W | S] after token ``last`` of the chunk, in closed form (gates in the weights' dtype),
    written into ``out`` (buffers shaped like ``xs``, none of them ``xs``) if given."""
    a_r, b_r, e_r = (x[..., last, None, None] for x in (g.a, g.b, g.e))  # (B, H, 1, 1)
    c_r, d_r = g.c[..., last, :, None], g.d[..., last, :, None]       # (B, H, n, 1)
    new = []
    for layer, (x, hk, delta) in enumerate(zip(xs, key.inputs, key.deltas)):
        w, s = halves(x)
        hk_t = hk.transpose(-1, -2)  # (B, H, d_in, n)
        xn = torch.empty_like(x) if out is None else out[layer]
        wn, sn = halves(xn)
        if opts.no_forgetting:
            wn.copy_(w)
        else:
            torch.mul(w, a_r, out=wn)
        if opts.no_momentum:  # b = e = 0: S_r = -D_rr hk_r^T delta_r
            addmm_(wn, hk_t, c_r * delta, alpha=-1)
            d_rr = g.d[..., last, last, None, None]
            sn.zero_()
            addmm_(sn, hk_t[..., last:last + 1], d_rr * delta[..., last:last + 1, :], alpha=-1)
        else:
            wn.addcmul_(s, b_r)
            torch.mul(s, e_r, out=sn)
            addmm_(xn, hk_t, _scaled_pair(delta, c_r, d_r), alpha=-1)
        new.append(xn)
    return new


# -- backward --------------------------------------------------------------------------------
def ln_read_backward(grad_y: Tensor, stats: tuple[Tensor, Tensor], weight: Tensor
                     ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Back through the read-out's outer LayerNorm: (dz_L, (d w, d b)) from grad_y (B, H, n, V)."""
    x_hat, rstd = stats
    d_ln = ((grad_y * x_hat).sum((0, 2)), grad_y.sum((0, 2)))  # (H, V) each
    return layer_norm_backward(grad_y, x_hat, rstd, weight), d_ln


class ReadUpdateGrads(NamedTuple):
    q: Tensor | None             # (B, H, n, K), through the token read-out
    gates: Gates                 # (B, H, n[, n]) each
    inputs: list[Tensor | None]  # per layer, the key pass inputs hk
    deltas: list[Tensor | None]  # per layer, the key pass deltas
    xs: list[Tensor]             # per layer, [dW_0 | dS_0]
    ln: tuple[Tensor | None, Tensor | None]


def read_update_backward(q: Tensor, key: KeyPass, read: Read | None, g: Gates, xs: Sequence[Tensor], *,
                         last: int, opts: Options, ln: tuple[Tensor, Tensor] | None,
                         grad_y: Tensor | None, grad_x: Sequence[Tensor | None], owned: bool = False,
                         scratch: Sequence[Tensor] | None = None) -> ReadUpdateGrads:
    """VJP of ``read_token`` (when ``read`` is given) and ``update`` for one chunk of n real
    tokens (formulas in the module docstring). ``grad_y`` (B, H, n, V) and ``grad_x`` (per
    layer) are the gradients of the read-out and of [W | S] after the chunk (None: zero).
    ``owned``: ``grad_x`` may be overwritten (it becomes the returned [dW_0 | dS_0]: fresh
    weight-sized buffers cost page faults on CPU); ``scratch``: one weight-sized buffer per
    layer for the gate gradients' dot products."""
    act = ACTIVATIONS[opts.activation]
    n_layers, n = len(xs), q.shape[2]
    shape = (*q.shape[:2], n)
    d_a, d_b, d_e = (q.new_zeros(shape) for _ in range(3))
    d_c, d_d = q.new_zeros(*shape, n), q.new_zeros(*shape, n)
    d_hk: list[Tensor | None] = [None] * n_layers
    d_delta: list[Tensor | None] = [None] * n_layers
    gxs: list[Tensor] = []
    c_r, d_r = g.c[..., last, :, None], g.d[..., last, :, None]  # (B, H, n, 1)
    a_r, b_r, e_r = (x[..., last, None, None] for x in (g.a, g.b, g.e))  # (B, H, 1, 1)

    def dot_(layer: int, x: Tensor, y: Tensor) -> Tensor:
        """<x, y> per (B, H) (through a reused buffer when there is one)."""
        if scratch is None:
            return dot(x, y)
        return torch.mul(x, y, out=scratch[layer]).sum((-2, -1))

    # the state after the chunk
    for layer, (x, gx_next) in enumerate(zip(xs, grad_x)):
        hk, delta = key.inputs[layer], key.deltas[layer]
        w, s = halves(x)
        if gx_next is None:
            gxs.append(torch.zeros_like(x))
            continue
        gw_next, gs_next = halves(gx_next)
        # everything that reads the incoming gradient first, ...
        if not opts.no_forgetting:
            d_a[..., last] += dot_(layer, gw_next, w)
        if opts.no_momentum:  # W_r = A_r W_0 - Hk^T diag(C_r) Delta,  S_r = -D_rr hk_r^T delta_r
            m = hk @ gw_next  # (B, H, n, d_out)
            d_c[..., last, :] -= (m * delta).sum(-1)
            d_delta[layer] = -(c_r * m)
            d_hk[layer] = -((c_r * delta) @ gw_next.transpose(-1, -2))
            d_rr = g.d[..., last, last, None, None]  # (B, H, 1, 1)
            m_r = hk[..., last:, :] @ gs_next  # (B, H, 1, d_out)
            d_d[..., last, last] -= (m_r[..., 0, :] * delta[..., last, :]).sum(-1)
            d_delta[layer][..., last:, :] -= d_rr * m_r
            d_hk[layer][..., last:, :] -= (d_rr * delta[..., last:, :]) @ gs_next.transpose(-1, -2)
        else:
            d_b[..., last] += dot_(layer, gw_next, s)
            d_e[..., last] += dot_(layer, gs_next, s)
            m, m_s = halves(hk @ gx_next)  # (B, H, n, d_out) each
            d_c[..., last, :] -= (m * delta).sum(-1)
            d_d[..., last, :] -= (m_s * delta).sum(-1)
            d_delta[layer] = torch.mul(m, c_r).addcmul_(m_s, d_r).neg_()
            d_hk[layer] = -(_scaled_pair(delta, c_r, d_r) @ gx_next.transpose(-1, -2))
        # ... then [dW_0 | dS_0] = [A_r dW_r | B_r dW_r + E_r dS_r], in place when allowed
        gx = gx_next if owned else torch.empty_like(x)
        gw, gs = halves(gx)
        if opts.no_momentum:
            gs.zero_()
        else:
            torch.mul(gs_next, e_r, out=gs)
            gs.addcmul_(gw_next, b_r)
        if opts.no_forgetting:
            gw.copy_(gw_next)
        else:
            torch.mul(gw_next, a_r, out=gw)
        gxs.append(gx)

    # the token read-out
    d_q, d_ln = None, (None, None)
    if read is not None and grad_y is not None:
        hq = [q] + [act.f(z) for z in read.pre[:-1]]  # each layer's input on the query path
        dz = grad_y
        if opts.residual:
            d_q = grad_y
        if ln is not None:
            dz, d_ln = ln_read_backward(grad_y, read.ln_stats, ln[0])
        for layer in reversed(range(n_layers)):
            x, gx = xs[layer], gxs[layer]
            h_in = with_one(hq[layer]) if opts.bias else hq[layer]  # (B, H, n, d_in)
            hk, delta = key.inputs[layer], key.deltas[layer]
            if opts.no_momentum:
                p = read.pq[layer]
                dzc = dz if opts.no_forgetting else dz * g.a[..., None]
                dh = dzc @ halves(x)[0].transpose(-1, -2)  # (B, H, n, d_in)
                addmm_(halves(gx)[0], h_in.transpose(-1, -2), dzc)
            else:
                p, q_s = halves(read.pq[layer])
                d_b += (dz * q_s).sum(-1)
                dzc = torch.empty_like(read.pq[layer])  # (B, H, n, 2 d_out): [A ⊙ dz | B ⊙ dz]
                dza, dzb = halves(dzc)
                dza.copy_(dz) if opts.no_forgetting else torch.mul(dz, g.a[..., None], out=dza)
                torch.mul(dz, g.b[..., None], out=dzb)
                dh = dzc @ x.transpose(-1, -2)  # (B, H, n, d_in)
                addmm_(gx, h_in.transpose(-1, -2), dzc)
            if not opts.no_forgetting:
                d_a += (dz * p).sum(-1)
            gram = h_in @ hk.transpose(-1, -2)  # (B, H, n, n)  h_t . hk_i
            d_gram = -(dz @ delta.transpose(-1, -2))  # (B, H, n, n)  d/d(C ⊙ gram)
            d_c += d_gram * gram
            d_gram.mul_(g.c)
            addmm_(dh, d_gram, hk)
            d_hk[layer] = acc(d_hk[layer], d_gram.transpose(-1, -2) @ h_in)
            gram_c = gram.mul_(g.c).transpose(-1, -2)
            if d_delta[layer] is None:
                d_delta[layer] = -(gram_c @ dz)
            else:
                addmm_(d_delta[layer], gram_c, dz, alpha=-1)
            if opts.bias:
                dh = dh[..., :-1]
            if layer > 0:
                dz = act.backward(dh, read.pre[layer - 1])
            else:
                d_q = acc(d_q, dh)
    return ReadUpdateGrads(d_q, Gates(d_a, d_b, d_c, d_e, d_d), d_hk, d_delta, gxs, d_ln)


def mlp_backward(grad_h: list[Tensor | None], grad_z: list[Tensor | None], tr: Trace,
                 weights: Sequence[Tensor], grad_w: list[Tensor], opts: Options) -> Tensor | None:
    """Back through ``trace_mlp``: given gradients of each layer's input (grad_h, None = 0)
    and pre-activation (grad_z, None = 0), accumulate each layer's weight gradient into
    ``grad_w`` in place and return the gradient of the MLP's input h_0."""
    act_backward = ACTIVATIONS[opts.activation].backward
    grad_z = list(grad_z)
    d_in = None
    for layer in reversed(range(len(weights))):
        gh = grad_h[layer]
        if grad_z[layer] is not None:
            addmm_(grad_w[layer], tr.inputs[layer].transpose(-1, -2), grad_z[layer])
            t = grad_z[layer] @ weights[layer].transpose(-1, -2)  # (B, H, n, d_in)
            gh = t if gh is None else t.add_(gh)
        if gh is None:
            continue
        if opts.bias:
            gh = gh[..., :-1]
        if layer > 0:
            gh = act_backward(gh, tr.pre[layer - 1])
            grad_z[layer - 1] = gh if grad_z[layer - 1] is None else grad_z[layer - 1].add_(gh)
        else:
            d_in = gh
    return d_in


def ln_top_backward(e: Tensor, delta: Tensor, x_hat: Tensor, rstd: Tensor, out: Tensor, v: Tensor,
                    ln: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
    """VJP of the key pass's top delta through the outer LayerNorm (module docstring):
    delta = delta_L = LN'(z)^T (2 (out - v) ⊙ w) with out = LN(z) (+ k), as the key pass wrote it
    (before any soft clip). From e = d delta_L (B, H, n, V), returns (dz, d out, (d w, d b));
    dv = -d out and, with a residual memory, dk += d out. x_hat, rstd: the LayerNorm's
    normalised z and 1/sigma from the forward."""
    w = rearrange(ln[0], "h v -> h 1 v").to(x_hat.dtype)  # (H, 1, V)
    a = 2 * (out - v) * w  # g ⊙ w
    e_mean, ex_mean = e.mean(-1, keepdim=True), (e * x_hat).mean(-1, keepdim=True)
    d_a = rstd * (e - e_mean - x_hat * ex_mean)  # r P(e)
    d_r = (e * delta).sum(-1, keepdim=True) / rstd
    d_out = 2 * d_a * w
    d_xhat = -rstd * ((a * x_hat).mean(-1, keepdim=True) * e + a * ex_mean) + d_out * w
    d_z = rstd * (d_xhat - d_xhat.mean(-1, keepdim=True) - x_hat * (d_xhat * x_hat).mean(-1, keepdim=True))
    d_z -= d_r * rstd.pow(2) * x_hat / x_hat.shape[-1]
    d_w = (d_a * 2 * (out - v) + d_out * x_hat).sum((0, 2))  # (H, V)
    return d_z, d_out, (d_w, d_out.sum((0, 2)))


def key_pass_backward(key: KeyPass, start: Sequence[Tensor], grad_inputs: list[Tensor | None],
                      grad_deltas: list[Tensor | None], grad_start: list[Tensor], opts: Options,
                      k: Tensor | None = None, v: Tensor | None = None, ln: tuple[Tensor, Tensor] | None = None
                      ) -> tuple[Tensor | None, Tensor | None, tuple[Tensor | None, Tensor | None]]:
    """VJP of ``key_pass`` for the gradients of its inputs and deltas; accumulates the start
    weights' gradients into ``grad_start`` in place, returns (dk, dv, d_ln). With a LayerNorm
    it needs the keys k and values v of the chunk."""
    act = ACTIVATIONS[opts.activation]
    n_layers = len(start)
    g_delta = list(grad_deltas)
    g_z: list[Tensor | None] = [None] * n_layers
    # delta_l = mid_l * f'(z_l),  mid_l = delta_{l+1} W_{l+1}^T  (l < L-1), from the first layer up
    for layer in range(n_layers - 1):
        gd = g_delta[layer]
        if gd is None:
            continue
        pre = key.trace.pre[layer]
        g_mid = act.backward(gd, pre)
        g_z[layer] = act.grad2(pre).mul_(gd).mul_(key.mids[layer])
        w_next = start[layer + 1][..., :-1, :] if opts.bias else start[layer + 1]  # (d_l, d_{l+1})
        t = g_mid @ w_next  # (B, H, n, d_{l+1})
        g_delta[layer + 1] = t if g_delta[layer + 1] is None else t.add_(g_delta[layer + 1])
        gw_next = grad_start[layer + 1][..., :-1, :] if opts.bias else grad_start[layer + 1]
        raw = key.raw if key.raw is not None else key.deltas  # the chain of the unclipped deltas
        addmm_(gw_next, g_mid.transpose(-1, -2), raw[layer + 1])
    # delta_L = 2 (out - v), out = z_L (+ k with a residual memory)
    dk = dv = None
    d_ln: tuple[Tensor | None, Tensor | None] = (None, None)
    if g_delta[-1] is not None:
        if ln is None:
            g_out, dz = 2 * g_delta[-1], None
        else:
            out = key.trace.out + k if opts.residual else key.trace.out
            raw = key.raw if key.raw is not None else key.deltas
            dz, g_out, d_ln = ln_top_backward(g_delta[-1], raw[-1], *key.trace.ln_stats, out, v, ln)
        dv = -g_out
        dz = g_out if dz is None else dz
        g_z[-1] = dz if g_z[-1] is None else g_z[-1].add_(dz)
        if opts.residual:
            dk = g_out
    dk_mlp = mlp_backward(grad_inputs, g_z, key.trace, start, grad_start, opts)
    return acc(dk, dk_mlp), dv, d_ln


def read_start_backward(grad_y: Tensor, tr: Trace, start: Sequence[Tensor], grad_start: list[Tensor],
                        opts: Options, ln: tuple[Tensor, Tensor] | None
                        ) -> tuple[Tensor | None, tuple[Tensor | None, Tensor | None]]:
    """VJP of ``read="chunk_start"``, y = M_start(q): returns (dq, d_ln) and accumulates the
    start weights' gradients into ``grad_start`` in place."""
    n_layers = len(start)
    g_z: list[Tensor | None] = [None] * n_layers
    dz, d_ln = grad_y, (None, None)
    if ln is not None:
        dz, d_ln = ln_read_backward(grad_y, tr.ln_stats, ln[0])
    g_z[-1] = dz
    dq = mlp_backward([None] * n_layers, g_z, tr, start, grad_start, opts)
    return (acc(dq, grad_y) if opts.residual else dq), d_ln
