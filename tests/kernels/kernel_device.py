"""Where a kernel backend's tests run: CUDA when present, else the CPU where the backend can
run there (fla under Triton's interpreter); otherwise the test skips."""

from __future__ import annotations

import pytest
import torch

from seqzoo.kernels import is_available


def device_for(backend: str) -> torch.device:
    for device in ("cuda", "cpu"):
        if (device == "cpu" or torch.cuda.is_available()) and is_available(backend, device):
            return torch.device(device)
    pytest.skip(f"backend {backend!r} runs nowhere here (CUDA, or for fla TRITON_INTERPRET=1 on CPU)")
