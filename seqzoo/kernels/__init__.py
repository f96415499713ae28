"""Optional fast backends behind one availability check.

Nothing here imports a kernel package at module import time: ``is_available(name)`` tries
the import lazily (and caches the answer), so seqzoo imports on a laptop without any of them.

Backend names: "sdpa" (torch.nn.functional.scaled_dot_product_attention, always present),
"fla" (flash-linear-attention Triton kernels, CUDA only), "mamba_ssm" (CUDA only),
"causal_conv1d" (CUDA only).
"""

from __future__ import annotations

import importlib
from functools import lru_cache

import torch

from seqzoo.mixers.base import ConfigError

_MODULES: dict[str, tuple[str, bool]] = {
    # name: (module to import, needs CUDA)
    "sdpa": ("torch.nn.functional", False),
    "fla": ("fla", True),
    "mamba_ssm": ("mamba_ssm", True),
    "causal_conv1d": ("causal_conv1d", True),
}


@lru_cache(maxsize=None)
def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - any failure (missing CUDA, ABI) means unavailable
        return False
    return True


def is_available(name: str, device: torch.device | str = "cpu") -> bool:
    """Whether backend ``name`` can run on ``device`` in this environment."""
    if name == "reference":
        return True
    if name not in _MODULES:
        return False
    module, needs_cuda = _MODULES[name]
    if needs_cuda and torch.device(device).type != "cuda":
        return False
    return _importable(module)


def resolve_backend(requested: str, supported: tuple[str, ...], device: torch.device) -> str:
    """Pick the backend a mixer uses.

    ``auto``: the first of ``supported`` that can run on ``device``, else "reference".
    A named backend must be supported by the mixer and available, or it is an error
    (asking for a kernel and silently getting the reference would hide slow runs).
    """
    if requested == "auto":
        for name in supported:
            if is_available(name, device):
                return name
        return "reference"
    if requested == "reference":
        return "reference"
    if requested not in supported:
        raise ConfigError("backend", f"expected 'auto', 'reference' or one of {list(supported)}, got {requested!r}")
    if not is_available(requested, device):
        raise ConfigError("backend", f"{requested!r} is not available on {device} (package missing or no CUDA)")
    return requested
