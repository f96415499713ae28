"""Neural long-term memory (Titans, Behrouz, Zhong & Mirrokni 2024, section 3) as a
functional op, chunked, with every read-out computed by matmuls.

The memory is an MLP M with weights W_1..W_L (per batch element and head); layer l maps
d_{l-1} -> d_l with d_0 = K, d_L = V: h_0 = x, z_l = h_{l-1} W_l, h_l = act(z_l) for l < L,
M(x) = z_L (optionally LN(z_L) with an outer LayerNorm, optionally x + ...). Per token t:

    u_t = grad_W ||M(k_t) - v_t||^2          taken at the weights of the chunk start (eq. 16-18)
    S_t = eta_t S_{t-1} - theta_t u_t         momentum, "past surprise"      (eq. 14)
    M_t = (1 - alpha_t) M_{t-1} + S_t         forgetting / weight decay       (eq. 13)
    y_t = M_t(q_t)  (read="token")   or   y_t = M_{chunk start}(q_t)  (read="chunk_start")

``chunk_size=1`` is exactly the token recurrence of eq. 13-14.

How the chunked read-out works (DESIGN.md 5.9). Inside a chunk, with a_j = 1 - alpha_j,
A_t = prod_{j<=t} a_j, E_t = prod_{j<=t} eta_j, starting from weights M_0 and momentum S_0:

    M_t = A_t M_0 + B_t S_0 - sum_{i<=t} C_ti u_i,    B_t = sum_{s<=t} (A_t/A_s) E_s,
    C_ti = theta_i sum_{s=i..t} (A_t/A_s)(E_s/E_i)     (lower triangular, built in log space).

The gradient of layer l for token i is an outer product h_{l-1,i}^T delta_{l,i} (input of the
layer times its output-side delta, from one forward+backward of the MLP at the chunk-start
weights over the whole chunk). So the pre-activation of layer l for query t is

    h_t W_{l,t} = A_t (h_t W_{l,0}) + B_t (h_t S_{l,0}) - sum_i C_ti (h_t . hk_i) delta_{l,i},

i.e. ``A * (H W0) + B * (H S0) - (C ⊙ H Hk^T) Delta``: matmuls layer by layer, no per-token
weight tensor. At the chunk end W and S are updated in closed form, one matmul each per
layer (Hk^T diag(C_r) Delta and Hk^T diag(D_r) Delta, r the last token).

State (``TitansState``): the chunk-start weights (where gradients are taken), the current
weights M_t, the momentum S_t and the position inside the chunk, so a call may stop at any
token and the next call (or token-by-token decoding) continues the same computation.

Options beyond the paper's memory, used by TTT (Sun et al. 2024) on the same engine:
``residual`` (M(x) = x + MLP(x)), ``bias`` (each layer has a bias, stored as the last row of
its weight: layer l is (d_{l-1} + 1, d_l), the weight of a constant-1 input) and ``ln``, an
outer LayerNorm (weight, bias) of shape (H, V) applied to z_L before the residual; its
backward enters the deltas, its parameters are not updated by the inner loop.

Use from the hybrid blocks (MAC / MAG):

* read without writing (MAC's h = M_{s-1}(q) for a segment)::

      h = memory_read(state, q)                 # M with state.weights, no update

* write a segment and take its read-out (MAC writes its attention outputs y)::

      o, state = titans_memory(q_y, k_y, v_y, theta, eta, alpha, None, chunk_size=c,
                               initial_state=state, output_final_state=True)

  ``init_state(weights)`` makes the first state from initial weights.
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


def init_state(weights: Sequence[Tensor]) -> TitansState:
    """The state before the first token: M_0 = weights, S_0 = 0, at a chunk boundary."""
    weights = tuple(weights)
    return TitansState(weights, weights, tuple(torch.zeros_like(w) for w in weights), 0)


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


def _check_activation(activation: str) -> None:
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


def memory_read(memory: TitansState | Sequence[Tensor], x: Tensor, *, activation: str = "silu",
                residual: bool = False, bias: bool = False, ln: tuple[Tensor, Tensor] | None = None,
                ln_eps: float = 1e-6) -> Tensor:
    """M(x) with the memory's current weights, without writing. x: (B, T, H, K) -> (B, T, H, V).

    ``memory`` is a ``TitansState`` (its current weights are used) or a list of per-layer
    weights (B, H, d_in, d_out). The options must match those the memory was trained with."""
    _check_activation(activation)
    weights = memory.weights if isinstance(memory, TitansState) else tuple(memory)
    h = rearrange(x, "b t h k -> b h t k")  # (B, H, T, K)
    y = _mlp(h, weights, activation=activation, residual=residual, bias=bias, ln=ln, ln_eps=ln_eps)
    return rearrange(y, "b h t v -> b t h v")  # (B, T, H, V)


def _mlp(h: Tensor, weights: Weights, *, activation: str, residual: bool, bias: bool,
         ln: tuple[Tensor, Tensor] | None, ln_eps: float) -> Tensor:
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


class _Gates(NamedTuple):
    a: Tensor     # (..., n)     A_t = prod_{j<=t} (1 - alpha_j)
    b: Tensor     # (..., n)     B_t = sum_{s<=t} (A_t/A_s) E_s
    c: Tensor     # (..., n, n)  C_ti = theta_i sum_{s=i..t} (A_t/A_s)(E_s/E_i)
    e: Tensor     # (..., n)     E_t = prod_{j<=t} eta_j
    d: Tensor     # (..., n, n)  D_ti = theta_i E_t/E_i   (momentum: S_t = E_t S_0 - sum_i D_ti u_i)


def _gates(theta: Tensor, log_a: Tensor, log_e: Tensor) -> _Gates:
    """All inputs (..., n) in a float type of at least 32 bits."""
    decay = torch.exp(_segsum(log_a))  # (..., n, n) A_t / A_s
    mom = torch.exp(_segsum(log_e))    # (..., n, n) E_s / E_i
    a = torch.exp(torch.cumsum(log_a, -1))
    e = torch.exp(torch.cumsum(log_e, -1))
    b = (decay @ e[..., None])[..., 0]
    theta_cols = theta[..., None, :]
    return _Gates(a, b, (decay @ mom) * theta_cols, e, mom * theta_cols)


def _safe_log(x: Tensor) -> Tensor:
    # log 0 = -inf would give 0 * inf = nan in backward; the smallest normal is exact enough
    # (its powers underflow to 0 like the true products).
    return torch.log(x.clamp_min(torch.finfo(x.dtype).tiny))


def _sub_matmul(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """x - a @ b for (B, H, ., .) tensors, the subtraction fused into the GEMM."""
    out = torch.baddbmm(x.flatten(0, 1), a.flatten(0, 1), b.flatten(0, 1), alpha=-1)  # (B*H, d_in, d_out)
    return out.view(x.shape)


# -- one piece of a chunk ------------------------------------------------------------------
def _piece(q: Tensor, k: Tensor, v: Tensor, g: _Gates, state: TitansState, *, last: int,
           closes: bool, activation: str, read: str, residual: bool, bias: bool,
           ln: tuple[Tensor, Tensor] | None, ln_eps: float, no_momentum: bool = False,
           no_forgetting: bool = False) -> tuple[Tensor, TitansState]:
    """Tokens pos..pos+n-1 of one chunk. q, k: (B, H, n, K), v: (B, H, n, V); gates (B, H, n[, n]).
    ``last``: index of the last real token (tokens after it are padding); ``closes``: the chunk
    ends with this piece, so the new weights become the next chunk-start weights.
    ``no_momentum`` (eta == 0 everywhere: B = 0, S_t = -theta_t u_t) and ``no_forgetting``
    (alpha == 0: A = 1) skip terms that are exactly zero or one (TTT uses both)."""
    act, act_grad = ACTIVATIONS[activation]
    n_layers = len(state.start)
    dtype = q.dtype
    # 1) forward + backward of M at the chunk-start weights on the keys: per-layer inputs
    #    hk_{l-1} and output-side deltas delta_l (the gradient of layer l is hk^T delta).
    inputs, pre = [], []
    h = k
    for layer, w in enumerate(state.start):
        h_in = _with_one(h) if bias else h  # (B, H, n, d_in)
        inputs.append(h_in)
        z = h_in @ w
        pre.append(z)
        h = act(z) if layer < n_layers - 1 else z
    out = h
    if ln is not None:
        out, x_hat, rstd = _layer_norm(h, ln, ln_eps)
    if residual:
        out = out + k
    delta = 2 * (out - v)  # d||M(k) - v||^2 / d out, summed over V (no 1/2)
    if ln is not None:
        delta = _layer_norm_backward(delta, x_hat, rstd, ln[0])
    deltas = [delta]
    for layer in range(n_layers - 1, 0, -1):
        w = state.start[layer]
        w = w[..., :-1, :] if bias else w  # the bias row has no input to send a delta to
        delta = (delta @ w.transpose(-1, -2)) * act_grad(pre[layer - 1])
        deltas.append(delta)
    deltas.reverse()

    a, b, c, e, d = (x.to(dtype) for x in g)
    # 2) read-out.
    if read == "token":
        h = q
        for layer in range(n_layers):
            h_in = _with_one(h) if bias else h
            w0, s0 = state.weights[layer], state.momentum[layer]
            gram = (h_in @ inputs[layer].transpose(-1, -2)) * c  # (B, H, n, n) C_ti (h_t . hk_i)
            z = h_in @ w0 if no_forgetting else a[..., None] * (h_in @ w0)
            if not no_momentum:
                z = z + b[..., None] * (h_in @ s0)
            z = z - gram @ deltas[layer]
            h = act(z) if layer < n_layers - 1 else z
        if ln is not None:
            h = _layer_norm(h, ln, ln_eps)[0]
        y = q + h if residual else h
    else:
        y = _mlp(q, state.start, activation=activation, residual=residual, bias=bias, ln=ln, ln_eps=ln_eps)

    # 3) closed-form state at the last real token.
    a_r, b_r, e_r = (x[..., last, None, None] for x in (a, b, e))  # (B, H, 1, 1)
    c_r, d_r = c[..., last, :, None], d[..., last, :, None]       # (B, H, n, 1)
    new_w, new_s = [], []
    for layer in range(n_layers):
        hk_t = inputs[layer].transpose(-1, -2)  # (B, H, d_in, n)
        w0, s0 = state.weights[layer], state.momentum[layer]
        # Fused multiply-adds: these weight-sized passes cost as much as the matmuls on CPU.
        w_carried = w0 if no_forgetting else a_r * w0
        if no_momentum:  # S_r = -theta_r u_r: one outer product
            new_w.append(_sub_matmul(w_carried, hk_t, c_r * deltas[layer]))
            new_s.append(-(hk_t[..., last:last + 1] @ (d[..., last, last, None, None] * deltas[layer][..., last:last + 1, :])))
        else:
            new_w.append(_sub_matmul(torch.addcmul(w_carried, b_r, s0), hk_t, c_r * deltas[layer]))
            new_s.append(_sub_matmul(e_r * s0, hk_t, d_r * deltas[layer]))
    new_w, new_s = tuple(new_w), tuple(new_s)
    n_real = last + 1
    if closes:
        return y, TitansState(new_w, new_w, new_s, 0)
    return y, TitansState(state.start, new_w, new_s, state.pos + n_real)


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, theta: Tensor, eta: Tensor, alpha: Tensor,
                  state: TitansState, *, chunk_size: int, read: str, residual: bool, bias: bool) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected >= 1, got {chunk_size}")
    if read not in ("token", "chunk_start"):
        raise ValueError(f"read: expected 'token' or 'chunk_start', got {read!r}")
    if q.shape != k.shape or q.ndim != 4:
        raise ValueError(f"q and k must both be (B, T, H, K), got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be (B, T, H, V) with q's (B, T, H)={tuple(q.shape[:3])}, got {tuple(v.shape)}")
    for name, gate in (("theta", theta), ("eta", eta), ("alpha", alpha)):
        if gate.shape != q.shape[:3]:
            raise ValueError(f"{name} must be (B, T, H)={tuple(q.shape[:3])}, got {tuple(gate.shape)}")
    dims = [w.shape[-2] - int(bias) for w in state.start] + [state.start[-1].shape[-1]]
    if dims[0] != q.shape[-1] or dims[-1] != v.shape[-1]:
        raise ValueError(f"memory maps {dims[0]} -> {dims[-1]} but K={q.shape[-1]}, V={v.shape[-1]}")
    if residual and q.shape[-1] != v.shape[-1]:
        raise ValueError("residual memory needs K == V")
    if not 0 <= state.pos < chunk_size:
        raise ValueError(f"state position {state.pos} is not inside a chunk of {chunk_size}")


def titans_memory(q: Tensor, k: Tensor, v: Tensor, theta: Tensor, eta: Tensor, alpha: Tensor,
                  weights: Sequence[Tensor] | None, *, chunk_size: int, activation: str = "silu",
                  read: str = "token", initial_state: TitansState | None = None,
                  output_final_state: bool = False, residual: bool = False, bias: bool = False,
                  ln: tuple[Tensor, Tensor] | None = None,
                  ln_eps: float = 1e-6) -> tuple[Tensor, TitansState | None]:
    """Titans neural memory over a sequence (paper eq. 13-18), chunked, any T.

    q, k: (B, T, H, K); v: (B, T, H, V); theta >= 0, eta in [0, 1], alpha in [0, 1]: (B, T, H).
    weights: initial memory weights, layer l of shape (B, H, d_{l-1}, d_l) (one layer = a
    matrix memory); ignored (may be None) when ``initial_state`` is given.
    Returns o: (B, T, H, V) and the final ``TitansState`` (None unless ``output_final_state``).
    See the module docstring for the maths and the keyword-only TTT options."""
    _check_activation(activation)
    if initial_state is None:
        if weights is None:
            raise ValueError("weights: needed when no initial_state is given")
        initial_state = init_state(weights)
    state = initial_state
    _check_inputs(q, k, v, theta, eta, alpha, state, chunk_size=chunk_size, read=read,
                  residual=residual, bias=bias)
    B, T, H, _ = q.shape
    if T == 0:
        return v.new_zeros(v.shape), (state if output_final_state else None)
    gate_dtype = torch.promote_types(q.dtype, torch.float32)
    qh, kh, vh = (rearrange(x, "b t h d -> b h t d") for x in (q, k, v))  # (B, H, T, d)
    th, log_a, log_e = (rearrange(x.to(gate_dtype), "b t h -> b h t")  # (B, H, T)
                        for x in (theta, _safe_log(1 - alpha.to(gate_dtype)), _safe_log(eta.to(gate_dtype))))
    # Gates that are exactly zero (TTT, the paper's ablations) let whole terms be skipped.
    no_momentum = not eta.requires_grad and not bool(eta.any())
    no_forgetting = not alpha.requires_grad and not bool(alpha.any())
    opts = dict(activation=activation, read=read, residual=residual, bias=bias, ln=ln, ln_eps=ln_eps,
                no_momentum=no_momentum, no_forgetting=no_forgetting)
    outs = []

    # The first piece finishes the chunk the state is in (if it stopped mid-chunk).
    head = min(T, (chunk_size - state.pos) % chunk_size)
    if head:
        g = _gates(th[..., :head], log_a[..., :head], log_e[..., :head])
        y, state = _piece(qh[:, :, :head], kh[:, :, :head], vh[:, :, :head], g, state, last=head - 1,
                          closes=state.pos + head == chunk_size, **opts)
        outs.append(y)

    # The rest is chunk-aligned; the gates of all its chunks are built at once. The last chunk
    # is padded with theta = 0, eta = 1, alpha = 0 tokens: they write nothing and, being after
    # every real token, change no real output; the state is read at the last real token.
    rest = T - head
    if rest:
        n_chunks = -(-rest // chunk_size)
        pad = n_chunks * chunk_size - rest

        def chunks(x: Tensor, fill: float) -> Tensor:
            x = x[:, :, head:]
            if pad:
                x = F.pad(x, (0, 0, 0, pad) if x.ndim == 4 else (0, pad), value=fill)
            return x

        g = _gates(*(rearrange(chunks(x, 0.0), "b h (n c) -> n b h c", c=chunk_size)  # (N, B, H, C)
                     for x in (th, log_a, log_e)))
        qs, ks, vs = (rearrange(chunks(x, 0.0), "b h (n c) d -> n b h c d", c=chunk_size)  # (N, B, H, C, d)
                      for x in (qh, kh, vh))
        for i in range(n_chunks):
            real = chunk_size - pad if i == n_chunks - 1 else chunk_size
            y, state = _piece(qs[i], ks[i], vs[i], _Gates(*(x[i] for x in g)), state, last=real - 1,
                              closes=real == chunk_size, **opts)
            outs.append(y[:, :, :real])
    o = rearrange(torch.cat(outs, dim=2), "b h t v -> b t h v")  # (B, T, H, V)
    return o, (state if output_final_state else None)
