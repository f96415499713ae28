"""Mamba's selective scan (``seqzoo.ops.selective_scan``) in closed form, chunk by chunk.

A closed form per chunk of L tokens, chunk after chunk.
  The log-decay is an outer product, Δ_t[d] A[d, n], so inside a chunk that starts from
  h_0 the cumulative log-decay is A[d, n] Γ_t[d] with Γ_t = Σ_{j<=t} Δ_j, a cumulative sum
  over (B, T, D) only. With E_t = exp(A (Γ_t - Γ_ref)) for a reference Γ_ref[d] inside the
  chunk's range of Γ (and E_0 the same at Γ_0, the chunk start),

      h_t = E_t ⊙ S_t,   S_t = h_0 / E_0 + Σ_{s<=t} Δ_s u_s B_s / E_s,

  since E_t / E_s = exp(A (Γ_t - Γ_s)) is exactly the decay from s to t. A chunk is then
  about ten whole-chunk operations on (B, L, N, D) blocks (an outer product, exp, divide,
  multiply, a cumulative sum over L, multiply, a contraction with C) instead of six small
  operations per token; the blocks are small enough to stay in cache, and the state h_L
  passes to the next chunk. That is ~7 passes over O(T·D·N) data, as many as the
  sequential loop makes, in T/L·(~20) Python-level operations instead of 6·T.

  Stability: E_t and 1/E_s must stay finite and accurate. Γ_ref is the middle of the
  chunk's Γ range, (Γ_0 + Γ_L) / 2, so every exponent is at most ρ/2 in size, where
  ρ = Σ_t r_t over the chunk and r_t = max_{b,d} |Δ_t[b, d]| max_n |A[d, n]| (for Δ of
  any sign: |Γ_t - Γ_ref| <= (|Γ_t - Γ_0| + |Γ_L - Γ_t|) / 2). Chunk boundaries are chosen
  greedily so that ρ/2 stays within ``_MAX_EXPONENT`` (60 in fp32: e^±60 keep every
  intermediate far from overflow, and rounding an exponent x costs a relative error of
  about |x|·ε, 4e-6); strong decays simply give short chunks. A token whose own r_t
  exceeds the budget is a chunk of one with Γ_ref = Γ_1: E_1 = 1, and 1/E_0 = exp(Δ A) is
  the plain step's decay (it underflows to 0 just like the sequential form's). Γ is
  summed in fp64 over the whole sequence, so Γ_t - Γ_ref keeps its precision however long
  the sequence.

  Gradients come from a hand-written backward (``_ClosedFormScan``): the adjoint
  λ_t = ∂L/∂h_t obeys the reversed recurrence λ_t = C_t dy_t + exp(Δ_{t+1} A) λ_{t+1},
  whose closed form uses the same factors: λ_t = R_t / E_t with R_t = Σ_{s>=t} E_s C_s dy_s
  (+ E_L λ_{next chunk}). Then ∂L/∂(Δ_t A) = λ_t ⊙ exp(Δ_t A) h_{t-1} = R_t ⊙ S_{t-1},
  ∂L/∂(Δu)_t = Σ_n λ_t B_t, ∂L/∂B_t = Σ_d λ_t Δ_t u_t, ∂L/∂C_t = Σ_d dy_t h_t and
  ∂L/∂h_0 = R_1 / E_0. The forward keeps only the chunk-start states; the backward
  recomputes each chunk's E and S, so memory stays O(B·T·D + chunks·B·D·N + L·B·D·N).

Padding is not needed: chunks have any length, and any T works.

Negative eigenvalues (``allow_neg_eigval``: transition 2·exp(ΔA) − 1 ∈ (−1, 1], Grazzi et
al. 2024) are outside this form: log|2·exp(ΔA) − 1| is not the outer product Δ_t[d] A[d, n]
that makes Γ a (B, T, D) cumulative sum, the transition changes sign, and it is exactly 0
(log = −inf, E_t = 0, 1/E_s = inf) where exp(ΔA) = 1/2. With the option this function
falls back to ``selective_scan_sequential`` (exact, differentiated by autograd); the
hand-written backward of ``_ClosedFormScan`` only ever sees exp(ΔA).
"""

from __future__ import annotations

import bisect
import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from seqzoo.ops.selective_scan_layout import check_shapes, compute_dtype, finish


# The chunked form. Inside a chunk every tensor is time-major with the channels innermost,
# (B, L, N, D): one token is a contiguous slice, the cumulative sum over L adds whole
# slices, and sums over n run along a middle axis (vectorised over d), several times
# faster than sums over an innermost axis of N = 16.

_LOG2E = math.log2(math.e)
# Largest |exponent| a chunk may hold, by compute dtype: e^60 ≈ 1e26 leaves fp32 (≤ 3e38)
# room for the products E_t·S_t of inputs up to ~1e12; fp64 (≤ 1e308) has room for e^300.
_MAX_EXPONENT = {torch.float32: 60.0, torch.float64: 300.0}
# Rows summed one after the other inside a block of the cumulative sum (see _BlockedCumsum).
_ROWS = 8
# Default chunk lengths (tokens): about 2^19 / (B·D·N), within [8, 127]. Each chunk costs
# ~20 small operations (forward; ~35 backward), so longer is better until a chunk's
# (B, L, N, D) blocks spill far out of cache; measured on one core (1 MiB L2), fp32, for
# B·D·N from 2^11 (the benchmark's) to ~10^5.
_BLOCK_ELEMENTS = 2 ** 19
_CHUNK_RANGE = (_ROWS, 127)
# Shorter sequences scan faster token by token: the chunked form's set-up costs about as
# much as 16 to 32 sequential steps (method="auto").
MIN_AUTO_LENGTH = 24


def default_chunk_size(length: int, step_elements: int = 1) -> int:
    """Longest chunk (tokens) for T = ``length`` and a state of ``step_elements`` = B·D·N
    numbers: 2^19 / (B·D·N) within [8, 127] (see _BLOCK_ELEMENTS), at most T. From 15 up,
    rounded down to 8k - 1: with its start state a chunk is a cumulative sum over L + 1
    rows, done in whole blocks of 8 rows. The decay budget may cut chunks shorter (see the
    module doc)."""
    low, high = _CHUNK_RANGE
    size = min(high, max(low, _BLOCK_ELEMENTS // max(step_elements, 1)))
    if size >= 2 * _ROWS:
        size = (size + 1) // _ROWS * _ROWS - 1  # the largest 8k - 1 <= size
    return max(1, min(size, length))


def _chunk_bounds(rate: Tensor, max_len: int, max_exponent: float) -> list[int]:
    """Greedy chunk boundaries [0, t_1, ..., T]: each chunk has at most ``max_len`` tokens and
    Σ_t r_t <= 2·max_exponent with the rates r_t = max_{b,d} |Δ_t[b, d]| max_n |A[d, n]|
    (T,), the most any exponent A (Γ_t - Γ_ref) can move per token; a token over budget on
    its own is a chunk of one. Lengths are rounded down to 8k - 1 from 15 up, like
    ``default_chunk_size``."""
    length = rate.shape[0]
    reach = rate.double().cumsum(0).tolist()  # Σ_{t' <= t} r_t', as Python floats for bisect
    bounds, start = [0], 0
    while start < length:
        base = reach[start - 1] if start else 0.0
        stop = min(length, start + max_len)
        end = max(start + 1, bisect.bisect_right(reach, base + 2 * max_exponent, start, stop))
        if end < length and end - start >= 2 * _ROWS:
            end = start + (end - start + 1) // _ROWS * _ROWS - 1
        bounds.append(end)
        start = end
    return bounds


class _BlockedCumsum:
    """In-place cumulative sum along dim 1 of a fixed tensor x (from the end if ``reverse``).

    torch.cumsum along a non-innermost axis runs element by element (~10x slower than a
    multiply), and one addition per row costs L operations. Instead, in blocks of _ROWS
    rows: running sums inside every block at once (_ROWS - 1 additions of strided slices),
    running sums of the block totals (L/_ROWS - 1 small additions), then one broadcast
    addition of each block's carry: about two passes over x. The views are made once, for
    a workspace buffer that every chunk of this length reuses."""

    def __init__(self, x: Tensor, reverse: bool = False) -> None:
        length = x.shape[1]
        rows = _ROWS if length >= 2 * _ROWS else max(length, 1)
        blocks = length // rows
        tail = length - blocks * rows
        pairs = []  # (target, addend) in order: target += addend
        if not reverse:
            main = x[:, :blocks * rows].unflatten(1, (blocks, rows))  # (B, blocks, rows, ...)
            rs = main.unbind(2)  # rows x (B, blocks, ...)
            pairs += [(rs[i], rs[i - 1]) for i in range(1, rows)]
            totals = rs[-1].unbind(1)  # blocks x (B, ...)
            pairs += [(totals[j], totals[j - 1]) for j in range(1, blocks)]
            if blocks > 1 and rows > 1:  # carry of the blocks before
                pairs.append((main[:, 1:, :-1], main[:, :-1, -1:]))
            rest = x[:, length - tail - 1:].unbind(1) if tail else ()
            pairs += [(rest[k], rest[k - 1]) for k in range(1, len(rest))]
        else:  # the mirror image: blocks aligned to the end, the tail at the start
            main = x[:, tail:].unflatten(1, (blocks, rows))
            rs = main.unbind(2)
            pairs += [(rs[i], rs[i + 1]) for i in range(rows - 2, -1, -1)]
            totals = rs[0].unbind(1)
            pairs += [(totals[j], totals[j + 1]) for j in range(blocks - 2, -1, -1)]
            if blocks > 1 and rows > 1:  # carry of the blocks after
                pairs.append((main[:, :-1, 1:], main[:, 1:, :1]))
            rest = x[:, :tail + 1].unbind(1) if tail else ()
            pairs += [(rest[k], rest[k + 1]) for k in range(len(rest) - 2, -1, -1)]
        self.pairs = pairs

    def __call__(self) -> None:
        for target, addend in self.pairs:
            target.add_(addend)


def _transpose(x: Tensor) -> Tensor:
    """(B, X, Y) -> (B, Y, X) contiguous: a free view when x is stored that way already
    (e.g. Mamba's (B, D, T) views of (B, T, D) activations), else one 2-D copy per batch
    row: torch's blocked (cache-friendly) transpose serves 2-D copies only, and is ~4x
    faster than a strided 3-D copy on (D, T) = (128, 2048)."""
    if x.transpose(1, 2).is_contiguous():
        return x.transpose(1, 2)
    x = x.contiguous()
    out = x.new_empty(x.shape[0], x.shape[2], x.shape[1])
    for b in range(x.shape[0]):
        out[b].copy_(x[b].t())
    return out


def _untranspose(x: Tensor, like: Tensor) -> Tensor:
    """x (B, T, D) contiguous -> (B, D, T), stored like ``like`` (B, D, T): as a view if
    ``like`` is time-major in memory, else transposed, so that what follows runs on
    operands of one layout."""
    return x.transpose(1, 2) if like.transpose(1, 2).is_contiguous() else _transpose(x)


class _Operand:
    """B or C for the chunked form, time-major and ready to broadcast against a chunk's
    (B, L, N, D) blocks: (B, T, N, 1) when shared by all channels, (B, T, N, G, 1) for G
    channel groups (against a (B, L, N, G, D/G) view), (N, D) when time-invariant.
    ``chunks[c]`` is chunk c's slice; ``origin`` is mamba-ssm's shape."""

    def __init__(self, M: Tensor, lengths: list[int]) -> None:
        self.origin = M.shape
        self.static = M.dim() == 2
        self.groups = M.shape[1] if M.dim() == 4 else 1
        if self.static:  # (D, N)
            self.value = M.t().contiguous()  # (N, D)
            self.chunks = [self.value] * len(lengths)
            return
        flat = M.reshape(M.shape[0], -1, M.shape[-1])  # (B, G·N, T)
        value = rearrange(_transpose(flat), "b t (g n) -> b t n g", g=self.groups)  # (B, T, N, G)
        self.value = value[..., None].contiguous() if self.groups > 1 else value  # (B, T, N, G[, 1])
        self.chunks = list(self.value.split(lengths, 1))
        if self.groups == 1:  # as the rows of batched (1, N) @ (N, D) products   (B, L, 1, N)
            self.rows = [chunk.transpose(-1, -2) for chunk in self.chunks]

    def grouped(self, x: Tensor) -> Tensor:
        """A (B, L, N|1, D) block as M's chunks see it: (B, L, N|1, G, D/G) for G > 1 groups."""
        return x.unflatten(-1, (self.groups, -1)) if self.groups > 1 else x

    def mul_(self, x: Tensor, c: int) -> Tensor:
        """x ⊙ M_t[n] (broadcast over d), in place. x: (B, L, N, D)."""
        self.grouped(x).mul_(self.chunks[c])
        return x

    def sum_n(self, x: Tensor, c: int, out: Tensor) -> Tensor:
        """Σ_n M_t[n] x_t[n, d]: (B, L, N, D) -> ``out`` (B, L, 1, D)."""
        if not self.static and self.groups == 1:  # a batch of (1, N) @ (N, D) products
            torch.matmul(self.rows[c], x, out=out)
        else:
            torch.sum(self.grouped(x) * self.chunks[c], 2, keepdim=True, out=self.grouped(out))
        return out

    def sum_d(self, x: Tensor, v: Tensor, scratch: Tensor) -> Tensor:
        """Σ_d x[n, d] v[n, d] over the channels that share one M[n]: x (B, L, N, D), v
        broadcastable to it -> M's layout (summed over B and L too if time-invariant). The
        product goes to ``scratch`` (like x): for v (B, L, 1, D) a batched matrix-vector
        product would read x only once, but torch runs it ~5x slower than this."""
        prod = torch.mul(x, v, out=scratch)  # (B, L, N, D)
        if self.static:
            return prod.sum((0, 1))  # (N, D)
        return self.grouped(prod).sum(-1, keepdim=self.groups > 1)  # (B, L, N[, G, 1])

    def gradient(self, chunks: list[Tensor]) -> Tensor:
        """Per-chunk gradients in ``chunks`` layout (chunk order) -> mamba-ssm's layout."""
        if self.static:
            return sum(chunks).t()  # (D, N)
        grad = rearrange(torch.cat(chunks, 1), "b t n ... -> b t (... n)")  # (B, T, G·N)
        return _transpose(grad).reshape(self.origin)  # (B, [G,] N, T)


class _Plan:
    """The chunks of one scan and what each chunk reads besides B and C, time-major: its
    Γ_t - Γ_ref in the compute dtype, E_0 = exp(A (Γ_0 - Γ_ref)), and Δ u. Γ is summed in
    fp64, so that Γ_t - Γ_ref keeps its precision however long the sequence. A is kept in
    log2 units: exp2 is ~4x faster than exp in torch on CPU. Few (B, T, D)-sized
    temporaries: on a VM, fresh memory costs page faults worth several passes over it."""

    def __init__(self, delta: Tensor, du: Tensor, A: Tensor, max_len: int) -> None:
        scratch = delta * A.abs().amax(1)[:, None]  # |Δ_t[b, d]| max_n |A[d, n]|   (B, D, T)
        self.bounds = _chunk_bounds(scratch.abs_().amax((0, 1)), max_len,
                                    _MAX_EXPONENT.get(delta.dtype, 60.0))
        self.lengths = [e - s for s, e in zip(self.bounds[:-1], self.bounds[1:])]
        lengths = torch.tensor(self.lengths, device=delta.device)
        gamma = torch.cumsum(delta, -1, dtype=torch.float64)  # Γ_t   (B, D, T)
        g_end = gamma[..., lengths.cumsum(0) - 1]  # Γ at each chunk's end   (B, D, chunks)
        g_start = F.pad(g_end[..., :-1], (1, 0))  # and at its start (Γ_0 = 0)
        # The middle of the chunk's Γ range; a chunk of one token uses its end (module doc).
        ref = torch.where(lengths == 1, g_end, (g_start + g_end) / 2)  # (B, D, chunks)
        for part, r in zip(gamma.split(self.lengths, -1), ref.unbind(-1)):
            part.sub_(r[..., None])  # Γ_t - Γ_ref
        g = _transpose(scratch.copy_(gamma))  # (B, T, D) in the compute dtype
        self.A2 = rearrange(A * _LOG2E, "d n -> n d").contiguous()  # (N, D)
        self.g = g[:, :, None].split(self.lengths, 1)  # chunks x (B, L, 1, D)
        e0 = rearrange((g_start - ref).to(delta.dtype), "b d c -> b c 1 d")
        self.E0 = torch.exp2(e0 * self.A2).unbind(1)  # chunks x (B, N, D)
        self.du = _transpose(du)[:, :, None].split(self.lengths, 1)  # chunks x (B, L, 1, D)

    def chunk(self, c: int, h: Tensor, B: _Operand, work: _Views) -> Tensor:
        """Chunk c from state h (B, N, D): E_t into work.E (B, L, N, D), returned, and
        work.S (B, L + 1, N, D) = [h / E_0, S_1, ..., S_L] with
        S_t = h / E_0 + Σ_{s<=t} Δ_s u_s B_s / E_s."""
        torch.div(h, self.E0[c], out=work.S_first)  # first: h may be a view of work.E
        E = torch.mul(self.g[c], self.A2, out=work.E).exp2_()
        B.mul_(torch.div(self.du[c], E, out=work.S_tokens), c)
        work.cumsum_S()
        return E


class _Views:
    """Views of the workspace buffers for chunks of L tokens (made once per length)."""

    def __init__(self, buffers: dict[str, Tensor], L: int) -> None:
        self.E = buffers["E"][:, :L]  # (B, L, N, D)
        self.S = buffers["S"][:, :L + 1]  # (B, L + 1, N, D): h / E_0, then S_1 ... S_L
        self.E_last = self.E[:, -1]
        self.S_first, self.S_tokens, self.S_before = self.S[:, 0], self.S[:, 1:], self.S[:, :L]
        self.cumsum_S = _BlockedCumsum(self.S)
        if "R" in buffers:  # the backward's
            self.M = buffers["M"][:, :L]
            self.R = buffers["R"][:, :L + 1]  # R_1 ... R_L, then E_L λ_next
            self.R_first, self.R_tokens, self.R_last = self.R[:, 0], self.R[:, :L], self.R[:, L]
            self.cumsum_R = _BlockedCumsum(self.R, reverse=True)


class _Workspace:
    """Buffers for the longest chunk, reused by every chunk (and by the backward after the
    forward): no allocation per chunk, and the same few blocks stay in cache."""

    def __init__(self, plan: _Plan, batch: int, n_state: int, dim: int, like: Tensor) -> None:
        self.shape = (batch, max(plan.lengths) + 1, n_state, dim)
        self.buffers = {k: like.new_empty(self.shape) for k in ("E", "S")}
        self.views: dict[int, _Views] = {}

    def for_backward(self) -> None:
        self.buffers.update({k: self.buffers["E"].new_empty(self.shape) for k in ("M", "R")})
        self.views.clear()

    def __getitem__(self, L: int) -> _Views:
        if L not in self.views:
            self.views[L] = _Views(self.buffers, L)
        return self.views[L]


class _ClosedFormScan(torch.autograd.Function):
    """The chunked closed form (module doc) with its own backward.

    forward(delta (B, D, T) after bias and softplus, du = Δ·u (B, D, T), A (D, N), B and C
    (mamba-ssm's layouts), h0 (B, D, N), max_len) -> y = Σ_n C h (B, D, T) and h_T (B, D, N),
    all in one compute dtype. D·u and the z gate stay outside, under autograd."""

    @staticmethod
    def forward(ctx, delta: Tensor, du: Tensor, A: Tensor, B: Tensor, C: Tensor, h0: Tensor,
                max_len: int) -> tuple[Tensor, Tensor]:
        batch, dim, _ = delta.shape
        n_state = A.shape[1]
        plan = _Plan(delta, du, A, max_len)
        B_op, C_op = _Operand(B, plan.lengths), _Operand(C, plan.lengths)
        # The chunk-start states, kept for the backward (which recomputes every chunk from them).
        states = delta.new_empty(batch, len(plan.lengths) + 1, n_state, dim)
        states[:, 0] = rearrange(h0, "b d n -> b n d")
        keep = any(ctx.needs_input_grad)
        h, kept = states[:, 0], states.unbind(1)
        work = _Workspace(plan, batch, n_state, dim, delta)
        y = delta.new_empty(batch, delta.shape[-1], 1, dim)  # (B, T, 1, D)
        ys = y.split(plan.lengths, 1)
        for c, L in enumerate(plan.lengths):
            v = work[L]
            E = plan.chunk(c, h, B_op, v)
            H = E.mul_(v.S_tokens)  # h_t = E_t ⊙ S_t   (B, L, N, D)
            # Without a backward, the next chunk reads h_L in place (before it reuses E).
            h = kept[c + 1].copy_(v.E_last) if keep else v.E_last
            C_op.sum_n(H, c, out=ys[c])  # y_t = Σ_n C_t[n] h_t[n, :]
        y = _untranspose(y.squeeze(2), delta)  # (B, D, T)
        if keep:
            ctx.save_for_backward(delta, A)
            ctx.plan, ctx.ops, ctx.states, ctx.work = plan, (B_op, C_op), states, work
        return y, rearrange(h, "b n d -> b d n").contiguous()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: Tensor | None, dh: Tensor | None) -> tuple[Tensor | None, ...]:
        delta, A = ctx.saved_tensors
        plan, (B_op, C_op), states, work = ctx.plan, ctx.ops, ctx.states, ctx.work
        batch, dim, length = delta.shape
        n_state = A.shape[1]
        dy = _transpose(dy) if dy is not None else delta.new_zeros(batch, length, dim)  # (B, T, D)
        dy = dy[:, :, None].split(plan.lengths, 1)  # chunks x (B, L, 1, D)
        delta_t = _transpose(delta)[:, :, None].split(plan.lengths, 1)  # chunks x (B, L, 1, D)
        A_nd = rearrange(A, "d n -> n d")
        # λ: ∂L/∂h at the end of the chunk, from after it (at first the final state's).
        lam = rearrange(dh, "b d n -> b n d") if dh is not None else delta.new_zeros(batch, n_state, dim)
        work.for_backward()
        h = states.unbind(1)
        d_delta, d_du = delta.new_empty(batch, length, 1, dim), delta.new_empty(batch, length, 1, dim)
        d_delta_c, d_du_c = d_delta.split(plan.lengths, 1), d_du.split(plan.lengths, 1)  # (B, L, 1, D)
        dB, dC = [], []
        dA = torch.zeros_like(A_nd)  # (N, D)
        for c in range(len(plan.lengths) - 1, -1, -1):
            v = work[plan.lengths[c]]
            E = plan.chunk(c, h[c], B_op, v)  # recomputed
            # R_t = Σ_{s>=t} E_s C_s dy_s + E_L λ_next (row L of R holds the last term).
            torch.mul(E, dy[c], out=v.R_tokens)  # E_t dy_t
            dC.append(C_op.sum_d(v.R_tokens, v.S_tokens, v.M))  # Σ_d (E_t dy_t) S_t = Σ_d dy_t h_t
            C_op.mul_(v.R_tokens, c)
            torch.mul(v.E_last, lam, out=v.R_last)
            v.cumsum_R()
            lam = v.R_first / plan.E0[c]  # ∂L/∂h_0 = R_1 / E_0: λ for the chunk before
            # ∂L/∂(Δ_t A) = λ_t ⊙ exp(Δ_t A) h_{t-1} = R_t ⊙ S_{t-1}
            M = torch.mul(v.R_tokens, v.S_before, out=v.M)  # (B, L, N, D)
            # Σ_n A[n, d] ∂L/∂(Δ_t A)[n, d]; S is not needed any more and takes the product.
            torch.sum(torch.mul(M, A_nd, out=v.S_before), 2, keepdim=True, out=d_delta_c[c])
            dA += M.mul_(delta_t[c]).sum((0, 1))
            lam_t = v.R_tokens.div_(E)  # λ_t = R_t / E_t
            B_op.sum_n(lam_t, c, out=d_du_c[c])  # Σ_n λ_t B_t
            dB.append(B_op.sum_d(lam_t, plan.du[c], v.M))  # Σ_d λ_t Δ_t u_t
        return (_untranspose(d_delta.squeeze(2), delta), _untranspose(d_du.squeeze(2), delta),
                rearrange(dA, "n d -> d n"),
                B_op.gradient(dB[::-1]), C_op.gradient(dC[::-1]), rearrange(lam, "b n d -> b d n"), None)


def selective_scan_chunked(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                           D: Tensor | None = None, z: Tensor | None = None,
                           delta_bias: Tensor | None = None, delta_softplus: bool = False,
                           initial_state: Tensor | None = None, return_final_state: bool = False,
                           *, chunk_size: int | None = None,
                           allow_neg_eigval: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """The same scan in closed form, chunk by chunk, with chunks of at most ``chunk_size``
    tokens (default: ``default_chunk_size``) that the decay budget may cut shorter; see the
    module doc. Same outputs as ``selective_scan_sequential``, which it runs instead with
    ``allow_neg_eigval`` (module doc)."""
    batch, dim, length, n_state, _, _ = check_shapes(u, delta, A, B, C, initial_state)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size}")
    if allow_neg_eigval:
        from seqzoo.ops.selective_scan import selective_scan_sequential  # imports this module

        return selective_scan_sequential(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                                         return_final_state, allow_neg_eigval=True)
    dt = compute_dtype(u.dtype)
    h0 = (u.new_zeros(batch, dim, n_state, dtype=dt) if initial_state is None
          else initial_state.to(dt))
    if length == 0:
        return finish(u.new_zeros(batch, dim, 0, dtype=dt), h0, u, D, z, return_final_state)
    delta = delta.to(dt)
    if delta_bias is not None:
        delta = delta + rearrange(delta_bias.to(dt), "d -> d 1")
    if delta_softplus:
        delta = F.softplus(delta)
    max_len = chunk_size or default_chunk_size(length, batch * dim * n_state)
    y, h = _ClosedFormScan.apply(delta, delta * u.to(dt), A.to(dt), B.to(dt), C.to(dt), h0, max_len)
    return finish(y, h, u, D, z, return_final_state)
