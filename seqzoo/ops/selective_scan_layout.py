"""Shapes and layouts shared by the two forms of Mamba's selective scan
(``seqzoo.ops.selective_scan``, ``seqzoo.ops.selective_scan_chunked``): mamba-ssm's layouts,
u, delta, z: (B, D, T); A: (D, N); B, C: (B, N, T), (B, G, N, T) or (D, N); state (B, D, N)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half precision loses the state over long scans; mamba-ssm also scans in fp32.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def groups_of(M: Tensor, n_channels: int) -> int:
    """Number of channel groups a B or C tensor implies (1 = shared by all channels)."""
    if M.dim() == 2:  # (D, N) time-invariant: one "group" per channel
        return n_channels
    if M.dim() == 3:  # (B, N, T)
        return 1
    if M.dim() == 4:  # (B, G, N, T)
        return M.shape[1]
    raise ValueError(f"B/C: expected (D, N), (B, N, T) or (B, G, N, T), got shape {tuple(M.shape)}")


def as_groups(M: Tensor, groups: int, dtype: torch.dtype) -> Tensor:
    """B or C time-major, broadcastable to (B, T, G, D/G, N) for ``groups`` = G."""
    M = M.to(dtype)
    if M.dim() == 2:
        return rearrange(M, "(g h) n -> 1 1 g h n", g=groups)  # (1, 1, G, D/G, N)
    if M.dim() == 3:
        return rearrange(M, "b n t -> b t 1 1 n")  # (B, T, 1, 1, N)
    # G divides ``groups`` (both divide D): sub-group g*r + i lies inside group g.
    return repeat(M, "b g n t -> b t (g r) 1 n", r=groups // M.shape[1])  # (B, T, G, 1, N)


def check_shapes(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                  initial_state: Tensor | None) -> tuple[int, int, int, int, int, int]:
    """Validates mamba-ssm's layouts; returns B, D, T, N and the groups of B and C."""
    if A.is_complex():
        raise NotImplementedError("selective_scan: complex A (S4D-Lin) is not supported; "
                                  "Mamba uses a real A = -exp(A_log)")
    batch, dim, length = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta: expected shape {tuple(u.shape)} like u, got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A: expected shape (D={dim}, N), got {tuple(A.shape)}")
    n_state = A.shape[1]
    gb, gc = groups_of(B, dim), groups_of(C, dim)
    for name, M, g in (("B", B, gb), ("C", C, gc)):
        if dim % g != 0:
            raise ValueError(f"{name}: {g} groups do not divide D={dim}")
        ok = (M.shape == (dim, n_state) if M.dim() == 2 else
              M.shape[0] == batch and M.shape[-2] == n_state and M.shape[-1] == length)
        if not ok:
            raise ValueError(f"{name}: shape {tuple(M.shape)} does not match B={batch}, D={dim}, "
                             f"N={n_state}, T={length}")
    if initial_state is not None and initial_state.shape != (batch, dim, n_state):
        raise ValueError(f"initial_state: expected shape {(batch, dim, n_state)}, "
                         f"got {tuple(initial_state.shape)}")
    return batch, dim, length, n_state, gb, gc


def finish(y: Tensor, h_last: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None,
            return_final_state: bool) -> Tensor | tuple[Tensor, Tensor]:
    """y: (B, D, T) and h_last: (B, D, N) in the compute dtype -> mamba-ssm's outputs."""
    if D is not None:
        y = y + u.to(y.dtype) * rearrange(D.to(y.dtype), "d -> d 1")
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    y = y.to(u.dtype)
    return (y, h_last) if return_final_state else y
