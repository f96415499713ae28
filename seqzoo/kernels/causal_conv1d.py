"""causal-conv1d's CUDA kernel (Dao et al., github.com/Dao-AILab/causal-conv1d) for seqzoo's
short causal depthwise convolution (``seqzoo.layers.short_conv``), states included.

seqzoo's layout is (B, T, D); viewed as (B, D, T) it is the "channel-last" memory layout
(stride 1 along D) in which the kernel accepts initial states and returns final ones, so
no copy of the activations is needed. The state is the last W - 1 inputs, (B, D, W - 1),
in both. CUDA only: on CPU the binding is never chosen and its tests skip.
"""

from __future__ import annotations

from typing import Callable

from einops import rearrange
from torch import Tensor

from seqzoo.kernels.library import KernelOp


def _kernel() -> Callable[..., tuple[Tensor, Tensor]]:
    from causal_conv1d import causal_conv1d_fn

    return causal_conv1d_fn


def _impl(x: Tensor, weight: Tensor, bias: Tensor, state: Tensor, silu: bool,
          fn: Callable[..., tuple[Tensor, Tensor]] | None = None) -> tuple[Tensor, Tensor]:
    """x: (B, T, D), weight: (D, W), bias: (D,), state: (B, D, W - 1)."""
    fn = fn or _kernel()
    xt = rearrange(x, "b t d -> b d t")  # (B, D, T), stride 1 along D
    state = rearrange(rearrange(state, "b d w -> b w d").contiguous(), "b w d -> b d w")  # channel-last too
    y, final = fn(xt, weight.to(x.dtype), bias.to(x.dtype), initial_states=state.to(x.dtype),
                  return_final_states=True, activation="silu" if silu else None)
    return rearrange(y, "b d t -> b t d"), final  # (B, T, D), (B, D, W - 1)


def _fake(x: Tensor, weight: Tensor, bias: Tensor, state: Tensor, silu: bool) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape), x.new_empty(state.shape)


CAUSAL_CONV1D = KernelOp("causal_conv1d", _impl, tensors=["x", "weight", "bias", "state"], scalars=[("bool", "silu")],
                         n_outputs=2, fake=_fake)


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None, state: Tensor, *,
                  activation: str | None) -> tuple[Tensor, Tensor]:
    """y = act(causal depthwise conv(x)) continuing from ``state``; returns y (B, T, D) and
    the new state (B, D, W - 1). weight: (D, 1, W) as nn.Conv1d holds it."""
    w = rearrange(weight, "d 1 w -> d w")  # (D, W)
    b = bias if bias is not None else w.new_zeros(w.shape[0])
    y, final = CAUSAL_CONV1D(x, w, b, state, activation == "silu")
    return y, final.to(state.dtype)


def conv_limits(backend: str, *, width: int | None) -> str | None:
    """Why a mixer whose short conv has kernel ``width`` (None: no conv) cannot use
    causal-conv1d in ``backend``, or None."""
    from seqzoo.kernels import parts

    if "causal_conv1d" not in parts(backend):
        return None
    if width is None:
        return "the mixer has no short convolution for causal_conv1d to run"
    if not 2 <= width <= 4:
        return f"causal_conv1d's kernel takes widths 2-4, got {width}"
    return None
