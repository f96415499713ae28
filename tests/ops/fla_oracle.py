"""Access to flash-linear-attention's pure-PyTorch reference functions (``fla.ops.*.naive``)
as external oracles, skipping cleanly when the package (or triton, which it imports) is absent.

The naive references cast their inputs to fp32 internally. ``fp64`` runs one of them with
every fp32 cast / dtype argument promoted to fp64 (a TorchFunctionMode), so the oracle is
exercised at fp64 precision too; the fp64 tests at 1e-9 would fail if the promotion missed
a cast.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from typing import Any, Callable, Iterator

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map


def naive(module: str) -> Any:
    """``fla.ops.<module>.naive``, or skip the test when it cannot be imported."""
    pytest.importorskip("triton")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Triton is not supported on current platform" on CPU
        pytest.importorskip("fla")
        try:
            return importlib.import_module(f"fla.ops.{module}.naive")
        except Exception as err:  # noqa: BLE001 - an fla build without that reference
            pytest.skip(f"fla.ops.{module}.naive unavailable: {err}")


class _PromoteFloat32(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.float:
            return args[0].to(torch.float64)
        swap = lambda a: torch.float64 if a is torch.float32 else a  # noqa: E731
        return func(*tree_map(swap, args), **tree_map(swap, kwargs))


@contextlib.contextmanager
def _promoted() -> Iterator[None]:
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with _PromoteFloat32():
            yield
    finally:
        torch.set_default_dtype(default)


def call(fn: Callable[..., Any], *args: Any, dtype: torch.dtype, **kwargs: Any) -> Any:
    """Run oracle ``fn`` so that it computes in ``dtype`` (fp32 as written, or fp64)."""
    if dtype == torch.float64:
        with _promoted():
            return fn(*args, **kwargs)
    return fn(*args, **kwargs)
