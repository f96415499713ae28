"""Building blocks of the Titans memory op (``seqzoo.ops.titans``): the memory MLP's
activations with their first and second derivatives, LayerNorm with its backward, the
in-chunk gate products of eq. 13-14 in log space, and GEMM helpers. Free of nn.Module.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

Fn = Callable[[Tensor], Tensor]


# -- activations: f, f', f'' ----------------------------------------------------------------
def _silu_grad(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def _silu_grad2(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1 - s) * (2 + z * (1 - 2 * s))


def _normal_pdf(z: Tensor) -> Tensor:
    return torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def _gelu_grad(z: Tensor) -> Tensor:
    return 0.5 * (1 + torch.erf(z * 2 ** -0.5)) + z * _normal_pdf(z)


def _gelu_grad2(z: Tensor) -> Tensor:
    return _normal_pdf(z) * (2 - z * z)


_C, _A = math.sqrt(2 / math.pi), 0.044715  # the tanh approximation: u = C (z + A z^3)


def _gelu_tanh_grad(z: Tensor) -> Tensor:
    th = torch.tanh(_C * (z + _A * z ** 3))
    return 0.5 * (1 + th) + 0.5 * z * (1 - th * th) * _C * (1 + 3 * _A * z * z)


def _gelu_tanh_grad2(z: Tensor) -> Tensor:
    th = torch.tanh(_C * (z + _A * z ** 3))
    du, d2u = _C * (1 + 3 * _A * z * z), _C * 6 * _A * z
    return (1 - th * th) * (du + 0.5 * z * (d2u - 2 * th * du * du))


class Activation(NamedTuple):
    """f; grad * f'(z) as torch's fused kernel where there is one (fast, but not itself
    differentiable); f' and f'' as differentiable compositions."""

    f: Fn
    backward: Callable[[Tensor, Tensor], Tensor]
    grad: Fn
    grad2: Fn


ACTIVATIONS: dict[str, Activation] = {
    "silu": Activation(F.silu, torch.ops.aten.silu_backward, _silu_grad, _silu_grad2),
    "gelu": Activation(F.gelu, lambda g, z: torch.ops.aten.gelu_backward(g, z), _gelu_grad, _gelu_grad2),
    "gelu_tanh": Activation(lambda z: F.gelu(z, approximate="tanh"),
                            lambda g, z: torch.ops.aten.gelu_backward(g, z, approximate="tanh"),
                            _gelu_tanh_grad, _gelu_tanh_grad2),
    "relu": Activation(F.relu, lambda g, z: g * (z > 0), lambda z: (z > 0).to(z.dtype), torch.zeros_like),
    "identity": Activation(lambda z: z, lambda g, z: g, torch.ones_like, torch.zeros_like),
}


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {activation!r}")


def with_one(h: Tensor) -> Tensor:
    """Append the constant-1 input that carries a layer's bias."""
    return torch.cat([h, h.new_ones(*h.shape[:-1], 1)], dim=-1)


# -- LayerNorm over the last dim with per-head (H, V) affine parameters ----------------------
def layer_norm(z: Tensor, ln: tuple[Tensor, Tensor], eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """z: (B, H, n, V) -> (y, x_hat, 1/sigma), 1/sigma: (B, H, n, 1). Normalised by torch's
    fused kernel without affine parameters (they differ per head), then scaled and shifted."""
    x_hat, _, rstd = torch.native_layer_norm(z, z.shape[-1:], None, None, eps)
    weight, bias = (rearrange(p, "h v -> h 1 v").to(z.dtype) for p in ln)  # (H, 1, V)
    return torch.addcmul(bias, x_hat, weight), x_hat, rstd


def layer_norm_backward(g: Tensor, x_hat: Tensor, rstd: Tensor, weight: Tensor) -> Tensor:
    """d/dz of <g, LN(z)> for g: (B, H, n, V)."""
    g = g * rearrange(weight, "h v -> h 1 v").to(g.dtype)  # (B, H, n, V)
    return rstd * (g - g.mean(-1, keepdim=True) - x_hat * (g * x_hat).mean(-1, keepdim=True))


def mlp(h: Tensor, weights: Sequence[Tensor], *, activation: str, residual: bool, bias: bool,
        ln: tuple[Tensor, Tensor] | None, ln_eps: float) -> Tensor:
    """M(h) for h: (B, H, n, d_0) with per-layer weights (B, H, d_in[+1], d_out)."""
    act = ACTIVATIONS[activation][0]
    x = h
    for layer, w in enumerate(weights):
        z = (with_one(h) if bias else h) @ w  # (B, H, n, d_out)
        h = act(z) if layer < len(weights) - 1 else z
    if ln is not None:
        h = layer_norm(h, ln, ln_eps)[0]
    return x + h if residual else h


# -- gates -----------------------------------------------------------------------------------
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
    """The in-chunk products of the per-token gates (a_j = 1 - alpha_j)."""

    a: Tensor     # (..., n)     A_t = prod_{j<=t} a_j
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


# -- GEMM helpers on (B, H, ., .) tensors ----------------------------------------------------
def flat(x: Tensor) -> Tensor:
    """(B, H, i, j) -> (B*H, i, j), a view (torch's in-place GEMMs want 3-d operands)."""
    return x.flatten(0, 1)


def addmm_(out: Tensor, a: Tensor, b: Tensor, *, alpha: float = 1.0) -> Tensor:
    """out += alpha * a @ b in place (out may be a strided view, e.g. one half of [W | S])."""
    flat(out).baddbmm_(flat(a), flat(b), alpha=alpha)
    return out


def dot(x: Tensor, y: Tensor) -> Tensor:
    """<x, y> over the last two dims of (B, H, i, j) tensors: (B, H). A plain product and sum:
    einsum would copy strided operands (the halves of [W | S]) and call a slow GEMV."""
    return (x * y).sum((-2, -1))


def acc(x: Tensor | None, y: Tensor | None) -> Tensor | None:
    """x + y where None means zero."""
    return x if y is None else (y if x is None else x + y)
