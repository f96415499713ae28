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

How the chunked read-out works (DESIGN.md 5.9; the formulas are in ``titans_chunk``). Inside
a chunk every weight M_t is M_0 and S_0 decayed by products of the gates, minus a
gate-weighted sum of the chunk's gradients u_i; each u_i of an MLP layer is an outer product
(layer input of key i times its output-side delta), so M_t(q_t) for every t of the chunk is
``A * (H W0) + B * (H S0) - (C ⊙ H Hk^T) Delta``, layer by layer: a handful of matmuls and
no per-token weight tensor. At the chunk end W and S are updated in closed form.

Training: the op is a ``torch.autograd.Function`` whose backward walks the chunks in
reverse with a hand-derived VJP for the weight-sized parts (``titans_chunk.chunk_backward``).
It keeps one (weights, momentum) pair per chunk and the query path's pre-activations, and
recomputes the cheap rest, so memory grows as T / chunk_size weight copies.

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

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from torch.autograd.function import once_differentiable

from seqzoo.ops.titans_chunk import (
    ACTIVATIONS,
    Gates,
    Options,
    TitansState,
    check_activation,
    chunk_forward,
    gates,
    key_pass,
    log_gates,
    mlp,
    read_token,
    read_update_backward,
    update,
)

__all__ = ["ACTIVATIONS", "TitansState", "init_state", "memory_read", "titans_memory"]


def init_state(weights: Sequence[Tensor]) -> TitansState:
    """The state before the first token: M_0 = weights, S_0 = 0, at a chunk boundary."""
    weights = tuple(weights)
    return TitansState(weights, weights, tuple(torch.zeros_like(w) for w in weights), 0)


def memory_read(memory: TitansState | Sequence[Tensor], x: Tensor, *, activation: str = "silu",
                residual: bool = False, bias: bool = False, ln: tuple[Tensor, Tensor] | None = None,
                ln_eps: float = 1e-6) -> Tensor:
    """M(x) with the memory's current weights, without writing. x: (B, T, H, K) -> (B, T, H, V).

    ``memory`` is a ``TitansState`` (its current weights are used) or a list of per-layer
    weights (B, H, d_in, d_out). The options must match those the memory was trained with."""
    check_activation(activation)
    weights = memory.weights if isinstance(memory, TitansState) else tuple(memory)
    h = rearrange(x, "b t h k -> b h t k")  # (B, H, T, K)
    y = mlp(h, weights, activation=activation, residual=residual, bias=bias, ln=ln, ln_eps=ln_eps)
    return rearrange(y, "b h t v -> b t h v")  # (B, T, H, V)


def _scan(qh: Tensor, kh: Tensor, vh: Tensor, theta: Tensor, eta: Tensor, alpha: Tensor,
          state: TitansState, *, chunk_size: int, opts: Options,
          ln: tuple[Tensor, Tensor] | None) -> tuple[Tensor, TitansState]:
    """The chunk loop without autograd. qh, kh, vh: (B, H, T, d); theta, eta, alpha: (B, H, T).
    Returns the read-out (B, H, T, V) and the final state."""
    th, log_a, log_e = log_gates(theta, eta, alpha)
    outs = []
    for lo, hi, closes, g in _pieces(th, log_a, log_e, pos=state.pos, chunk_size=chunk_size):
        y, state = chunk_forward(qh[:, :, lo:hi], kh[:, :, lo:hi], vh[:, :, lo:hi], g, state,
                                 last=hi - lo - 1, closes=closes, opts=opts, ln=ln)
        outs.append(y)
    return torch.cat(outs, dim=2), state


def _pieces(th: Tensor, log_a: Tensor, log_e: Tensor, *, pos: int,
            chunk_size: int) -> list[tuple[int, int, bool, Gates]]:
    """Cut T tokens into chunk pieces: (lo, hi, closes, gates of tokens lo..hi-1).

    The first piece finishes the chunk the state is in (if it stopped mid-chunk); the rest
    is chunk-aligned and the gates of all its chunks are built at once (the last chunk padded
    with theta = 0, eta = 1, alpha = 0, then cut back: a gate at token t depends only on
    tokens <= t)."""
    T = th.shape[-1]
    pieces = []
    head = min(T, (chunk_size - pos) % chunk_size)
    if head:
        g = gates(th[..., :head], log_a[..., :head], log_e[..., :head])
        pieces.append((0, head, pos + head == chunk_size, g))
    rest = T - head
    if rest:
        n_chunks = -(-rest // chunk_size)
        pad = n_chunks * chunk_size - rest
        g = gates(*(rearrange(F.pad(x[..., head:], (0, pad)), "b h (n c) -> n b h c", c=chunk_size)  # (N, B, H, C)
                    for x in (th, log_a, log_e)))
        for i in range(n_chunks):
            lo = head + i * chunk_size
            hi = min(lo + chunk_size, T)
            n = hi - lo
            pieces.append((lo, hi, n == chunk_size, Gates(g.a[i, ..., :n], g.b[i, ..., :n], g.c[i, ..., :n, :n],
                                                          g.e[i, ..., :n], g.d[i, ..., :n, :n])))
    return pieces


class _Piece(NamedTuple):
    """What the backward needs of one chunk piece (tokens lo..hi-1 of the call)."""

    lo: int
    hi: int
    closes: bool
    state: TitansState        # the state the piece started from
    gates: Gates              # under autograd (a graph back to theta, eta, alpha)
    leaves: list[Tensor]      # the key pass's own leaves: k, v, q (or None), start weights
    inputs: list[Tensor]      # key pass outputs under autograd: each layer's input hk ...
    deltas: list[Tensor]      # ... and output-side delta
    y_start: Tensor | None    # read="chunk_start": the read-out under autograd
    pre_q: list[Tensor]       # read="token": the query path's pre-activations


class _Spec(NamedTuple):
    chunk_size: int
    pos: int
    n_layers: int
    opts: Options
    has_ln: bool


class _TitansMemory(torch.autograd.Function):
    """The chunk loop with a hand-derived backward for the weight-sized parts (read-out and
    state update, ``titans_chunk.read_update_backward``); the small parts (gates, the MLP's
    forward+backward on the keys) keep their autograd graphs from the forward, so nothing is
    recomputed. Inputs: spec, qh, kh, vh (B, H, T, d), theta, eta, alpha (B, H, T), LayerNorm
    weight and bias (or None), then the state's start, weights and momentum tensors, one per
    layer each. Outputs: o (B, H, T, V), the final weights and momentum per layer and, when
    the call ends mid-chunk, the final chunk-start weights per layer."""

    @staticmethod
    def forward(ctx, spec: _Spec, qh: Tensor, kh: Tensor, vh: Tensor, theta: Tensor, eta: Tensor,
                alpha: Tensor, ln_w: Tensor | None, ln_b: Tensor | None, *state_tensors: Tensor):
        L, opts = spec.n_layers, spec.opts
        state = TitansState(state_tensors[:L], state_tensors[L:2 * L], state_tensors[2 * L:], spec.pos)
        with torch.enable_grad():
            gate_leaves = [x.detach().requires_grad_() for x in (theta, eta, alpha)]
            ln_leaves = [p.detach().requires_grad_() for p in (ln_w, ln_b)] if spec.has_ln else []
            cut = _pieces(*log_gates(*gate_leaves), pos=state.pos, chunk_size=spec.chunk_size)
        ln = tuple(ln_leaves) if spec.has_ln else None
        pieces, outs = [], []
        for lo, hi, closes, g in cut:
            with torch.enable_grad():  # the key pass keeps its graph for the backward
                k = kh[:, :, lo:hi].detach().requires_grad_()
                v = vh[:, :, lo:hi].detach().requires_grad_()
                start = [w.detach().requires_grad_() for w in state.start]
                inputs, deltas = key_pass(k, v, tuple(start), opts, ln)
                q, y_start = None, None
                if opts.read == "chunk_start":
                    q = qh[:, :, lo:hi].detach().requires_grad_()
                    y_start = mlp(q, start, activation=opts.activation, residual=opts.residual,
                                  bias=opts.bias, ln=ln, ln_eps=opts.ln_eps)
            g_val = Gates(*(x.detach().to(qh.dtype) for x in g))
            hk, dl = [x.detach() for x in inputs], [x.detach() for x in deltas]
            ln_val = tuple(p.detach() for p in ln) if ln is not None else None
            pre_q = []
            if opts.read == "token":
                y, pre_q = read_token(qh[:, :, lo:hi], hk, dl, g_val, state, opts, ln_val)
            else:
                y = y_start.detach()
            outs.append(y)
            new = update(hk, dl, g_val, state, last=hi - lo - 1, closes=closes, opts=opts)
            pieces.append(_Piece(lo, hi, closes, state, g, [k, v, q, *start], inputs, deltas, y_start, pre_q))
            state = new
        ctx.spec, ctx.pieces, ctx.final_pos = spec, pieces, state.pos
        ctx.gate_leaves, ctx.ln_leaves = gate_leaves, ln_leaves
        ctx.save_for_backward(qh)
        ctx.set_materialize_grads(False)
        outputs = (torch.cat(outs, dim=2), *state.weights, *state.momentum)
        if state.pos:
            # A start that is an input of this call comes back as a view, so autograd sees
            # a fresh output; its gradient flows to that input through the backward.
            outputs += tuple(w.view_as(w) for w in state.start)
        return outputs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_o: Tensor | None, *grad_state: Tensor | None):
        spec: _Spec = ctx.spec
        L, opts = spec.n_layers, spec.opts
        (qh,) = ctx.saved_tensors
        g_w, g_s = list(grad_state[:L]), list(grad_state[L:2 * L])
        g_start = list(grad_state[2 * L:]) if ctx.final_pos else [None] * L
        ln_vals = tuple(p.detach() for p in ctx.ln_leaves) if spec.has_ln else None
        B, H, T, _ = qh.shape
        dq = torch.zeros_like(qh)
        dk = dv = None
        d_ln: list[Tensor | None] = [None, None]
        gate_outs, gate_grads = [], []

        def add(x: Tensor | None, y: Tensor | None) -> Tensor | None:
            return x if y is None else (y if x is None else x + y)

        for piece in reversed(ctx.pieces):
            if piece.closes:  # the next chunk's start is this piece's final weights
                g_w, g_start = [add(x, y) for x, y in zip(g_w, g_start)], [None] * L
            sl = slice(piece.lo, piece.hi)
            gy = grad_o[:, :, sl] if grad_o is not None else None
            g_val = Gates(*(x.detach().to(qh.dtype) for x in piece.gates))
            res = read_update_backward(qh[:, :, sl], [x.detach() for x in piece.inputs],
                                       [x.detach() for x in piece.deltas], g_val, piece.state, piece.pre_q,
                                       last=piece.hi - piece.lo - 1, opts=opts, ln=ln_vals, grad_y=gy,
                                       grad_w=g_w, grad_s=g_s)
            for x, gx in zip(piece.gates, res.gates):
                if gx is not None and x.requires_grad:
                    gate_outs.append(x)
                    gate_grads.append(gx.to(x.dtype))
            # back through the key pass (and the chunk-start read-out) with autograd
            outs, grads = [], []
            for x, gx in [*zip(piece.inputs, res.inputs), *zip(piece.deltas, res.deltas), (piece.y_start, gy)]:
                if x is not None and gx is not None and x.requires_grad:
                    outs.append(x)
                    grads.append(gx)
            leaves = [x for x in piece.leaves if x is not None] + list(ctx.ln_leaves)
            got = torch.autograd.grad(outs, leaves, grads, allow_unused=True) if outs else [None] * len(leaves)
            k_grad, v_grad, *rest = got
            q_grad = rest.pop(0) if opts.read == "chunk_start" else None
            d_start, ln_grads = rest[:L], rest[L:]
            if k_grad is not None:
                dk = torch.zeros(B, H, T, k_grad.shape[-1], dtype=k_grad.dtype, device=k_grad.device) if dk is None else dk
                dk[:, :, sl] = k_grad
            if v_grad is not None:
                dv = torch.zeros(B, H, T, v_grad.shape[-1], dtype=v_grad.dtype, device=v_grad.device) if dv is None else dv
                dv[:, :, sl] = v_grad
            dq_piece = add(res.q, q_grad)
            if dq_piece is not None:
                dq[:, :, sl] = dq_piece
            for i, part in enumerate((*res.ln, *ln_grads[:2])):
                d_ln[i % 2] = add(d_ln[i % 2], part)
            g_start = [add(x, y) for x, y in zip(g_start, d_start)]
            g_w, g_s = list(res.weights), list(res.momentum)

        d_gates = [None, None, None]
        if gate_outs:
            d_gates = list(torch.autograd.grad(gate_outs, ctx.gate_leaves, gate_grads, allow_unused=True))
        if spec.has_ln:
            d_ln = [x.to(p.dtype) if x is not None else None for x, p in zip(d_ln, ctx.ln_leaves)]
        return (None, dq, dk, dv, *d_gates, *d_ln, *g_start, *g_w, *g_s)


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
    check_activation(activation)
    if initial_state is None:
        if weights is None:
            raise ValueError("weights: needed when no initial_state is given")
        initial_state = init_state(weights)
    state = initial_state
    _check_inputs(q, k, v, theta, eta, alpha, state, chunk_size=chunk_size, read=read,
                  residual=residual, bias=bias)
    T = q.shape[1]
    if T == 0:
        return v.new_zeros(v.shape), (state if output_final_state else None)
    # Gates that are exactly zero (TTT, the paper's ablations) let whole terms be skipped.
    opts = Options(activation=activation, read=read, residual=residual, bias=bias, ln_eps=ln_eps,
                   no_momentum=not eta.requires_grad and not bool(eta.any()),
                   no_forgetting=not alpha.requires_grad and not bool(alpha.any()))
    qh, kh, vh = (rearrange(x, "b t h d -> b h t d") for x in (q, k, v))  # (B, H, T, d)
    th, et, al = (rearrange(x, "b t h -> b h t") for x in (theta, eta, alpha))  # (B, H, T)
    state_tensors = (*state.start, *state.weights, *state.momentum)
    inputs = (qh, kh, vh, th, et, al, *(ln or ()), *state_tensors)
    if torch.is_grad_enabled() and any(x.requires_grad for x in inputs):
        L = len(state.start)
        spec = _Spec(chunk_size, state.pos, L, opts, ln is not None)
        ln_w, ln_b = ln if ln is not None else (None, None)
        out = _TitansMemory.apply(spec, qh, kh, vh, th, et, al, ln_w, ln_b, *state_tensors)
        o, weights_, momentum = out[0], tuple(out[1:1 + L]), tuple(out[1 + L:1 + 2 * L])
        pos = (state.pos + T) % chunk_size
        start = tuple(out[1 + 2 * L:]) if pos else weights_
        final = TitansState(start, weights_, momentum, pos)
    else:
        o, final = _scan(qh, kh, vh, th, et, al, state, chunk_size=chunk_size, opts=opts, ln=ln)
    o = rearrange(o, "b h t v -> b t h v")  # (B, T, H, V)
    return o, (final if output_final_state else None)
