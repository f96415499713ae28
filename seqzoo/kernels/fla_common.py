"""What every flash-linear-attention binding shares: the lazy import of an fla op (with
Triton's interpreter patched when it runs on CPU) and the fp32 state fla's kernels take.

fla (Yang, Zhang et al., github.com/fla-org/flash-linear-attention) lays tensors out as
seqzoo does: q, k (B, T, H, K), v (B, T, H, V), per-head gates (B, T, H) or (B, T, H, K)
in log space, states (B, H, K, V).
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any, Callable

import torch
from torch import Tensor

from seqzoo.kernels.library import state_dtype
from seqzoo.kernels.triton_interpret import ensure_patched


def fla_function(module: str, name: str) -> Callable[..., Any]:
    """``fla.ops.<module>.<name>``, imported on first use."""
    ensure_patched()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Triton is not supported on current platform" under the interpreter
        return getattr(importlib.import_module(f"fla.ops.{module}"), name)


def initial_state_fp32(initial_state: Tensor | None, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """fla's kernels read (and some require) the initial state in fp32; zeros when absent,
    so that every kernel call has the same signature."""
    if initial_state is None:
        return torch.zeros(shape, dtype=torch.float32, device=like.device)
    return initial_state.float()


def finish(o: Tensor, final: Tensor, v: Tensor, initial_state: Tensor | None,
           output_final_state: bool) -> tuple[Tensor, Tensor | None]:
    """o in v's dtype; the final state in the dtype of the state passed in (the caller's
    state dtype), or as the reference would return it."""
    if not output_final_state:
        return o.to(v.dtype), None
    return o.to(v.dtype), final.to(initial_state.dtype if initial_state is not None else state_dtype(v))
