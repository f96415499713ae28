"""Shared test utilities: tolerances (DESIGN.md section 3) and seeded mixer construction."""

from __future__ import annotations

import torch

from seqzoo import mixers

TOL = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=1e-4)}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, msg: str = "") -> None:
    dtype = dtype or expected.dtype
    torch.testing.assert_close(actual, expected, **TOL[dtype], msg=lambda m: f"{msg}\n{m}")


def build_mixer(name: str, params: dict, *, d_model: int = 16, dtype=torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    mixer = mixers.build(name, d_model=d_model, **params).to(dtype)
    with torch.no_grad():  # non-trivial parameters: break symmetries a zero-init might hide
        for p in mixer.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return mixer.eval()


def scan_steps(mixer, x: torch.Tensor, state):
    """Decode token by token; returns (B, T, D) outputs and the final state."""
    ys = []
    for t in range(x.shape[1]):
        y, state = mixer.step(x[:, t], state)
        ys.append(y)
    return torch.stack(ys, 1), state
