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

Training: the op is a ``torch.autograd.Function`` (``_TitansMemory``) whose backward walks
the chunks in reverse with the hand-derived VJP of ``titans_chunk`` (read-out, state update
and the key pass, the latter through f'' of the activation); only the n x n gate products go
through autograd, in one call at the end. It keeps one [W | S] per chunk and activation-sized
traces (memory grows as T / chunk_size weight copies plus O(T) activations) and frees each
chunk's share as soon as the backward has used it. Internally W and S of a layer sit side
by side in one (B, H, d_in, 2 d_out) tensor, so every product with both is one GEMM; the
``TitansState`` it returns holds views of it.

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
    KeyPass,
    Options,
    Read,
    Trace,
    clip_backward,
    halves,
    key_pass,
    key_pass_backward,
    read_start_backward,
    read_token,
    read_update_backward,
    trace_mlp,
    update,
)
from seqzoo.ops.titans_math import ACTIVATIONS, Gates, acc, check_activation, gates, log_gates, mlp

__all__ = ["ACTIVATIONS", "TitansState", "init_state", "memory_read", "titans_memory"]

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


# -- the op's internal layout: per layer [W | S] side by side ----------------------------------
def _fused(w: Tensor, s: Tensor) -> Tensor:
    """[W | S] (B, H, d_in, 2 d_out); no copy when w and s are already the halves of one."""
    base = w._base
    d = w.shape[-1]
    if (base is not None and s._base is base and base.is_contiguous() and base.shape == (*w.shape[:-1], 2 * d)
            and w.data_ptr() == base.data_ptr() and s.data_ptr() == base.data_ptr() + d * base.element_size()):
        return base
    return torch.cat([w, s], dim=-1)


def _shares_start(state: TitansState) -> bool:
    """Whether the chunk-start weights are the current weights (the state is at a chunk
    boundary), so they need not be carried separately."""
    return all(st is w for st, w in zip(state.start, state.weights))


class _Piece(NamedTuple):
    """One chunk piece of a call: tokens lo..hi-1, its gates and, under autograd, what its
    backward needs."""

    lo: int
    hi: int
    closes: bool              # the chunk ends with this piece
    group: int                # which batch of gates it is in (see ``_cut``) ...
    index: int | None         # ... and where (None: the batch is this piece alone)
    xs: list[Tensor] | None = None       # [W | S] per layer before the piece
    start: list[Tensor] | None = None    # the chunk-start weights it takes gradients at
    shared: bool = False                 # ``start`` is the W half of ``xs``
    key: KeyPass | None = None
    read: Read | None = None             # read="token"
    read_start: Trace | None = None      # read="chunk_start"


def _cut(th: Tensor, log_a: Tensor, log_e: Tensor, *, pos: int, chunk_size: int) -> tuple[list[_Piece], list[Gates]]:
    """Cut T tokens into chunk pieces and build their gates, as few batches as possible.

    The first piece finishes the chunk the state is in (if it stopped mid-chunk); the rest
    is chunk-aligned and the gates of all its chunks are built at once, the last chunk padded
    with theta = 0, eta = 1, alpha = 0 (a gate at token t depends only on tokens <= t, so
    the padding changes nothing that is used)."""
    T = th.shape[-1]
    pieces, groups = [], []
    head = min(T, (chunk_size - pos) % chunk_size)
    if head:
        groups.append(gates(th[..., :head], log_a[..., :head], log_e[..., :head]))
        pieces.append(_Piece(0, head, pos + head == chunk_size, 0, None))
    rest = T - head
    if rest:
        n_chunks = -(-rest // chunk_size)
        pad = n_chunks * chunk_size - rest
        groups.append(gates(*(rearrange(F.pad(x[..., head:], (0, pad)), "b h (n c) -> n b h c", c=chunk_size)  # (N, B, H, C)
                              for x in (th, log_a, log_e))))
        for i in range(n_chunks):
            lo = head + i * chunk_size
            hi = min(lo + chunk_size, T)
            pieces.append(_Piece(lo, hi, hi - lo == chunk_size, len(groups) - 1, i))
    return pieces, groups


def _piece_gates(groups: list[Gates], piece: _Piece, dtype: torch.dtype) -> Gates:
    """The piece's gates, cut to its n tokens, detached, in the activations' dtype."""
    g, n = groups[piece.group], piece.hi - piece.lo
    if piece.index is not None:
        g = Gates(*(x[piece.index] for x in g))
    return Gates(g.a[..., :n].detach().to(dtype), g.b[..., :n].detach().to(dtype),
                 g.c[..., :n, :n].detach().to(dtype), g.e[..., :n].detach().to(dtype),
                 g.d[..., :n, :n].detach().to(dtype))


def _run(qh: Tensor, kh: Tensor, vh: Tensor, theta: Tensor, eta: Tensor, alpha: Tensor, xs: list[Tensor],
         start: list[Tensor] | None, pos: int, *, chunk_size: int, opts: Options,
         ln: tuple[Tensor, Tensor] | None, record: list[_Piece] | None = None,
         gate_groups: list[Gates] | None = None) -> tuple[Tensor, list[Tensor], list[Tensor] | None, int]:
    """The chunk loop. qh, kh, vh: (B, H, T, d); theta, eta, alpha: (B, H, T); ``xs`` the
    [W | S] per layer, ``start`` the chunk-start weights (None: the W halves of ``xs``).
    Returns the read-out (B, H, T, V), the final xs, start (None: shared) and position.
    With ``record`` (under autograd) each piece keeps what its backward needs; the gates
    then come in ``gate_groups``."""
    if gate_groups is None:
        cut, gate_groups = _cut(*log_gates(theta, eta, alpha), pos=pos, chunk_size=chunk_size)
    else:
        cut = _cut_only(qh.shape[2], pos, chunk_size)
    outs, inputs, spare = [], set(map(id, xs)), None
    for piece in cut:
        lo, hi = piece.lo, piece.hi
        g = _piece_gates(gate_groups, piece, qh.dtype)
        q, k, v = qh[:, :, lo:hi], kh[:, :, lo:hi], vh[:, :, lo:hi]
        shared = start is None
        st = [halves(x)[0] for x in xs] if shared else start
        key = key_pass(k, v, st, opts, ln)
        rd = tr = None
        if opts.read == "token":
            rd = read_token(q, key, g, xs, opts, ln)
            y = rd.y
        else:
            tr = trace_mlp(q, st, opts, ln)
            y = tr.out + q if opts.residual else tr.out
        outs.append(y)
        new = update(key, g, xs, last=hi - lo - 1, opts=opts, out=spare)
        # Without a backward, a state that a closed chunk leaves behind is dead: its buffers
        # take the state after the next piece (fresh weight-sized buffers cost page faults).
        spare = xs if record is None and piece.closes and id(xs[0]) not in inputs else None
        if record is not None:
            record.append(piece._replace(xs=xs, start=st, shared=shared, key=key, read=rd, read_start=tr))
        xs = new
        start = None if piece.closes else st  # after a chunk boundary the start is the W half
        pos = (pos + hi - lo) % chunk_size
    return torch.cat(outs, dim=2), xs, start, pos


def _cut_only(T: int, pos: int, chunk_size: int) -> list[_Piece]:
    """``_cut`` without the gates (they were built already)."""
    pieces = []
    head = min(T, (chunk_size - pos) % chunk_size)
    if head:
        pieces.append(_Piece(0, head, pos + head == chunk_size, 0, None))
    for i, lo in enumerate(range(head, T, chunk_size)):
        hi = min(lo + chunk_size, T)
        pieces.append(_Piece(lo, hi, hi - lo == chunk_size, int(head > 0), i))
    return pieces


class _Spec(NamedTuple):
    chunk_size: int
    pos: int
    n_layers: int
    opts: Options
    has_ln: bool
    shared: bool      # the incoming state's start weights are its current weights


class _TitansMemory(torch.autograd.Function):
    """The chunk loop with a hand-derived backward (``titans_chunk``): nothing but the gate
    products (n x n per chunk, one autograd call at the end) goes through autograd, with or
    without the outer LayerNorm (its second derivative in the key pass is ``ln_top_backward``).
    Inputs: spec, qh, kh, vh (B, H, T, d), theta, eta, alpha (B, H, T), LayerNorm weight
    and bias (or None), [W | S] per layer, then (unless ``spec.shared``) the chunk-start
    weights per layer. Outputs: o (B, H, T, V), [W | S] per layer and, when the call ends
    mid-chunk, the chunk-start weights per layer."""

    @staticmethod
    def forward(ctx, spec: _Spec, qh: Tensor, kh: Tensor, vh: Tensor, theta: Tensor, eta: Tensor,
                alpha: Tensor, ln_w: Tensor | None, ln_b: Tensor | None, *tensors: Tensor):
        L = spec.n_layers
        xs, start = list(tensors[:L]), (None if spec.shared else list(tensors[L:]))
        with torch.enable_grad():
            gate_leaves = [x.detach().requires_grad_() for x in (theta, eta, alpha)]
            _, groups = _cut(*log_gates(*gate_leaves), pos=spec.pos, chunk_size=spec.chunk_size)
        ln = (ln_w.detach(), ln_b.detach()) if spec.has_ln else None
        pieces: list[_Piece] = []
        o, xs, start, pos = _run(qh, kh, vh, theta, eta, alpha, xs, start, spec.pos, chunk_size=spec.chunk_size,
                                 opts=spec.opts, ln=ln, record=pieces, gate_groups=groups)
        ctx.spec, ctx.pieces, ctx.groups = spec, pieces, groups
        ctx.gate_leaves, ctx.ln, ctx.ends_shared = gate_leaves, ln, start is None
        ctx.shapes = (qh.shape, kh.shape[-1], vh.shape[-1])
        ctx.save_for_backward(qh, kh, vh)
        ctx.set_materialize_grads(False)
        inputs = set(map(id, tensors))
        starts = () if start is None else tuple(w.view_as(w) if id(w) in inputs else w.clone() for w in start)
        return (o, *xs, *starts)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_o: Tensor | None, *grad_state: Tensor | None):
        if ctx.pieces is None:
            raise RuntimeError("titans_memory: backward ran twice through the same call (retain_graph); "
                               "the op frees what it saved piece by piece during the first backward")
        spec: _Spec = ctx.spec
        L, opts = spec.n_layers, spec.opts
        (B, H, T, K), Kk, V = ctx.shapes
        gx = list(grad_state[:L])
        g_start = list(grad_state[L:]) if not ctx.ends_shared else [None] * L
        ln = ctx.ln
        qh, kh, vh = ctx.saved_tensors
        dq, dk, dv = (qh.new_zeros(B, H, T, d) for d in (K, Kk, V))
        d_ln: list[Tensor | None] = [None, None]
        d_groups = [Gates(*(torch.zeros_like(x) for x in g)) for g in ctx.groups]
        scratch = [torch.empty_like(halves(x)[0]) for x in ctx.pieces[0].xs]  # for the gate gradients' dots
        owned = False  # whether the gradients in gx are buffers of this backward (may be overwritten)

        for i in reversed(range(len(ctx.pieces))):
            piece = ctx.pieces[i]
            ctx.pieces[i] = None  # freed as soon as it is used: the allocator reuses the memory
            n = piece.hi - piece.lo
            if piece.closes and any(x is not None for x in g_start):
                # the next chunk's start weights are the W half of this piece's output
                merged = []
                for x_out, g, s in zip(piece.xs, gx, g_start):
                    g = torch.zeros(x_out.shape, dtype=x_out.dtype, device=x_out.device) if g is None else g.clone()
                    if s is not None:
                        halves(g)[0].add_(s)
                    merged.append(g)
                gx, g_start, owned = merged, [None] * L, True
            sl = slice(piece.lo, piece.hi)
            gy = grad_o[:, :, sl] if grad_o is not None else None
            g = _piece_gates(ctx.groups, piece, qh.dtype)
            res = read_update_backward(qh[:, :, sl], piece.key, piece.read, g, piece.xs, last=n - 1,
                                       opts=opts, ln=ln, grad_y=gy if opts.read == "token" else None, grad_x=gx,
                                       owned=owned, scratch=scratch)
            # gradients of the chunk-start weights accumulate in place
            if piece.shared:
                acc_start = [halves(x)[0] for x in res.xs]
            else:
                acc_start = [torch.zeros_like(w) for w in piece.start]
            if not piece.closes:
                for a, s in zip(acc_start, g_start):
                    if s is not None:
                        a.add_(s)
            d_inputs, d_deltas = res.inputs, res.deltas
            if piece.key.scale is not None:  # back through the soft clip to the raw deltas
                d_inputs, d_deltas = clip_backward(piece.key, d_inputs, d_deltas, opts.max_grad_norm)
            k_grad, v_grad, key_ln_grad = key_pass_backward(
                piece.key, piece.start, d_inputs, d_deltas, acc_start, opts, k=kh[:, :, sl], v=vh[:, :, sl], ln=ln)
            d_ln = [acc(x, y) for x, y in zip(d_ln, key_ln_grad)]
            q_grad, ln_grad = res.q, res.ln
            if piece.read_start is not None and gy is not None:
                q_grad, ln_grad = read_start_backward(gy, piece.read_start, piece.start, acc_start, opts, ln)
            for full, part in ((dq, q_grad), (dk, k_grad), (dv, v_grad)):
                if part is not None:
                    full[:, :, sl] = part
            d_ln = [acc(x, y) for x, y in zip(d_ln, ln_grad)]
            dg = d_groups[piece.group]
            if piece.index is not None:
                dg = Gates(*(x[piece.index] for x in dg))
            for name in ("a", "b", "e"):
                getattr(dg, name)[..., :n].copy_(getattr(res.gates, name))
            for name in ("c", "d"):
                getattr(dg, name)[..., :n, :n].copy_(getattr(res.gates, name))
            gx, owned = res.xs, True
            g_start = [None] * L if piece.shared else acc_start

        ctx.pieces = None
        outs = [x for g in ctx.groups for x in g]
        grads = [x for g in d_groups for x in g]
        d_gates = torch.autograd.grad(outs, ctx.gate_leaves, grads, allow_unused=True)
        if spec.has_ln:
            d_ln = [x.to(p.dtype) if x is not None else None for x, p in zip(d_ln, ln)]
        starts = () if spec.shared else tuple(g_start)
        return (None, dq, dk, dv, *d_gates, *d_ln, *gx, *starts)

def _check_inputs(q: Tensor, k: Tensor, v: Tensor, theta: Tensor, eta: Tensor, alpha: Tensor,
                  state: TitansState, *, chunk_size: int, read: str, residual: bool, bias: bool,
                  max_grad_norm: float | None) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected >= 1, got {chunk_size}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm: expected a positive number or None, got {max_grad_norm}")
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


def _autocast_on(device_type: str) -> bool:
    if device_type not in ("cpu", "cuda"):  # e.g. "meta" (shapes only): autocast has no such device
        return False
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def titans_memory(q: Tensor, k: Tensor, v: Tensor, theta: Tensor, eta: Tensor, alpha: Tensor,
                  weights: Sequence[Tensor] | None, *, chunk_size: int, activation: str = "silu",
                  read: str = "token", initial_state: TitansState | None = None,
                  output_final_state: bool = False, residual: bool = False, bias: bool = False,
                  ln: tuple[Tensor, Tensor] | None = None, ln_eps: float = 1e-6,
                  max_grad_norm: float | None = None) -> tuple[Tensor, TitansState | None]:
    """Titans neural memory over a sequence (paper eq. 13-18), chunked, any T.

    q, k: (B, T, H, K); v: (B, T, H, V); theta >= 0, eta in [0, 1], alpha in [0, 1]: (B, T, H).
    weights: initial memory weights, layer l of shape (B, H, d_{l-1}, d_l) (one layer = a
    matrix memory); ignored (may be None) when ``initial_state`` is given.
    ``max_grad_norm`` G soft-clips every token's gradient (all layers together) to a norm
    below G: u_i -> u_i / sqrt(1 + ||u_i||^2 / G^2) (see "Stability" in the module docstring).
    Returns o: (B, T, H, V) and the final ``TitansState`` (None unless ``output_final_state``).
    See the module docstring for the maths and the keyword-only TTT options."""
    check_activation(activation)
    if initial_state is None:
        if weights is None:
            raise ValueError("weights: needed when no initial_state is given")
        initial_state = init_state(weights)
    state = initial_state
    if _autocast_on(q.device.type):
        # The inner gradient steps accumulate in place into the state's buffers (fp32 master
        # weights), which autocast's bf16 GEMM outputs cannot do: the memory runs in the
        # state's dtype, outside autocast; the projections around it keep autocast.
        dtype = state.weights[0].dtype
        with torch.autocast(device_type=q.device.type, enabled=False):
            return titans_memory(*(x.to(dtype) for x in (q, k, v, theta, eta, alpha)), None,
                                 chunk_size=chunk_size, activation=activation, read=read, initial_state=state,
                                 output_final_state=output_final_state, residual=residual, bias=bias,
                                 ln=None if ln is None else tuple(x.to(dtype) for x in ln), ln_eps=ln_eps)
    _check_inputs(q, k, v, theta, eta, alpha, state, chunk_size=chunk_size, read=read,
                  residual=residual, bias=bias, max_grad_norm=max_grad_norm)
    T, L = q.shape[1], len(state.weights)
    if T == 0:
        return v.new_zeros(v.shape), (state if output_final_state else None)
    # Gates that are exactly zero (TTT, the paper's ablations) let whole terms be skipped.
    opts = Options(activation=activation, read=read, residual=residual, bias=bias, ln_eps=ln_eps,
                   max_grad_norm=max_grad_norm,
                   no_momentum=not eta.requires_grad and not bool(eta.any()),
                   no_forgetting=not alpha.requires_grad and not bool(alpha.any()))
    qh, kh, vh = (rearrange(x, "b t h d -> b h t d") for x in (q, k, v))  # (B, H, T, d)
    th, et, al = (rearrange(x, "b t h -> b h t") for x in (theta, eta, alpha))  # (B, H, T)
    shared = _shares_start(state)
    xs = [_fused(w, s) for w, s in zip(state.weights, state.momentum)]  # (B, H, d_in, 2 d_out)
    start = None if shared else list(state.start)
    tensors = (qh, kh, vh, th, et, al, *(ln or ()), *xs, *(start or ()))
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        spec = _Spec(chunk_size, state.pos, L, opts, ln is not None, shared)
        ln_w, ln_b = ln if ln is not None else (None, None)
        out = _TitansMemory.apply(spec, qh, kh, vh, th, et, al, ln_w, ln_b, *xs, *(start or ()))
        o, xs = out[0], list(out[1:1 + L])
        start = list(out[1 + L:]) or None
        pos = (state.pos + T) % chunk_size
    else:
        o, xs, start, pos = _run(qh, kh, vh, th, et, al, xs, start, state.pos, chunk_size=chunk_size,
                                 opts=opts, ln=ln)
    o = rearrange(o, "b h t v -> b t h v")  # (B, T, H, V)
    if not output_final_state:
        return o, None
    w, s = zip(*(halves(x) for x in xs))
    return o, TitansState(w if start is None else tuple(start), w, s, pos)
