"""Optional fast backends behind one availability check.

Nothing here imports a kernel package at module import time: ``is_available(name)`` tries
the import lazily (and caches the answer), so seqzoo imports on a laptop without any of them.

Backend names: "sdpa" (torch.nn.functional.scaled_dot_product_attention, always present),
"fla" (flash-linear-attention's Triton kernels), "mamba_ssm" and "causal_conv1d" (CUDA
extensions). A mixer may use two at once, written "a+b" (e.g. "fla+causal_conv1d": fla for
the token mixing, causal-conv1d for its short convolutions); a combination is available
when each part is.

fla on CPU: Triton's interpreter (``TRITON_INTERPRET=1`` in the environment before triton
is imported) runs fla's real kernels on CPU, slowly. An explicit ``backend: fla`` is allowed
there, so that the kernels can be proven equal to the references without a GPU; ``auto``
never picks a kernel on CPU.
"""

from __future__ import annotations

import importlib
import os
from functools import lru_cache
from typing import Callable

import torch

from seqzoo.errors import ConfigError

# name: (module to import, dtypes its kernels compute)
_MODULES: dict[str, tuple[str, frozenset[torch.dtype]]] = {
    "sdpa": ("torch.nn.functional", frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})),
    "fla": ("fla", frozenset({torch.float16, torch.bfloat16, torch.float32})),
    "mamba_ssm": ("mamba_ssm", frozenset({torch.float16, torch.bfloat16, torch.float32})),
    "causal_conv1d": ("causal_conv1d", frozenset({torch.float16, torch.bfloat16, torch.float32})),
}
_CUDA_ONLY = frozenset({"fla", "mamba_ssm", "causal_conv1d"})
_INTERPRETABLE = frozenset({"fla"})  # pure Triton: runs under TRITON_INTERPRET=1


def triton_interpreting() -> bool:
    """Whether Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@lru_cache(maxsize=None)
def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - any failure (missing CUDA, ABI) means unavailable
        return False
    return True


def parts(name: str) -> tuple[str, ...]:
    """The kernels a backend name uses: "fla+causal_conv1d" -> ("fla", "causal_conv1d")."""
    return tuple(name.split("+")) if name != "reference" else ()


def _device_ok(name: str, device: torch.device) -> bool:
    """Whether kernel ``name`` (one part) can run on ``device`` at all, interpreter included."""
    if name not in _CUDA_ONLY or device.type == "cuda":
        return True
    return name in _INTERPRETABLE and device.type == "cpu" and triton_interpreting()


def is_available(name: str, device: torch.device | str = "cpu") -> bool:
    """Whether backend ``name`` (every part of it) can run on ``device`` in this environment."""
    if name == "reference":
        return True
    device = torch.device(device)
    return all(p in _MODULES and _device_ok(p, device) and _importable(_MODULES[p][0]) for p in parts(name))


def _native(name: str, device: torch.device) -> bool:
    """Available without the interpreter: what ``auto`` may pick."""
    return is_available(name, device) and all(p not in _CUDA_ONLY or device.type == "cuda" for p in parts(name))


def computes(name: str, dtype: torch.dtype) -> bool:
    """Whether every kernel of backend ``name`` computes in ``dtype``."""
    return _dtype_problem(name, dtype) is None


def interpreted(name: str, device: torch.device | str) -> bool:
    """Whether backend ``name`` runs on ``device`` only through Triton's interpreter."""
    device = torch.device(device)
    return is_available(name, device) and not _native(name, device)


def _dtype_problem(name: str, dtype: torch.dtype | None) -> str | None:
    for p in parts(name):
        if dtype is not None and p in _MODULES and dtype not in _MODULES[p][1]:
            return f"{p} kernels do not compute in {dtype}"
    return None


def resolve_backend(requested: str, supported: tuple[str, ...], device: torch.device, *,
                    dtype: torch.dtype | None = None,
                    limits: Callable[[str], str | None] | None = None) -> str:
    """Pick the backend a mixer uses.

    ``auto``: the first of ``supported`` that runs natively on ``device`` (never a kernel
    on CPU), computes ``dtype`` and can compute the mixer's configuration (``limits(name)``
    returns why not, or None), else "reference". A named backend must be supported by the
    mixer, available and able to compute the configuration, or it is an error: asking for a
    kernel and silently getting the reference would hide slow (or different) runs.
    """
    device = torch.device(device)
    if requested == "auto":
        for name in supported:
            if _native(name, device) and _dtype_problem(name, dtype) is None and not (limits and limits(name)):
                return name
        return "reference"
    if requested == "reference":
        return "reference"
    if requested not in supported:
        raise ConfigError("backend", f"expected 'auto', 'reference' or one of {list(supported)}, got {requested!r}")
    if not is_available(requested, device):
        raise ConfigError("backend", f"{requested!r} is not available on {device} (package missing or no CUDA; "
                                     f"fla runs on CPU only under TRITON_INTERPRET=1)")
    why = _dtype_problem(requested, dtype) or (limits(requested) if limits else None)
    if why:
        raise ConfigError("backend", f"{requested!r} cannot compute this configuration: {why}")
    return requested
