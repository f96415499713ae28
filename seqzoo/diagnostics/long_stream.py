"""Long-stream behaviour of a stateful mixer: feed one long sequence in calls of fixed length,
carrying the state, and record max|y| per call (Titans issue: a memory must neither blow up
on large inputs nor fade to zero under its forgetting gate)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from seqzoo import mixers
from seqzoo.mixers.base import iter_tensors


@dataclass
class StreamReport:
    name: str
    scale: float
    first_token: float          # max|y| at the stream's first token
    peaks: list[float]          # max|y| of each call
    finite: bool                # every output and the final state finite
    first_bad_call: int | None  # the first call with a non-finite output

    @property
    def lowest_ratio(self) -> float:
        """min over calls of max|y| / first-token max|y| (how far the read-out fades)."""
        return min(self.peaks) / self.first_token if self.first_token > 0 else math.nan


def stream(name: str, *, scale: float = 1.0, calls: int = 16, length: int = 1024, d_model: int = 32,
           seed: int = 0, repeat_every: int = 4, **params) -> StreamReport:
    """A default mixer (fp32, eval) fed ``calls`` x ``length`` tokens of N(0, scale^2) inputs;
    every ``repeat_every``-th call repeats one token throughout (aligned keys: the largest
    summed step of a chunk). Stops at the first non-finite output."""
    torch.manual_seed(seed)
    mixer = mixers.build(name, d_model=d_model, **params).float().eval()
    state = mixer.init_state(1, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    first, peaks, bad = math.nan, [], None
    with torch.no_grad():
        for call in range(calls):
            x = torch.randn(1, length, d_model, generator=g) * scale
            if repeat_every and call % repeat_every == repeat_every - 1:
                x = x[:, :1].expand(1, length, d_model)
            y, state = mixer(x, state)
            if call == 0:
                first = y[:, 0].abs().max().item()
            if not torch.isfinite(y).all():
                bad = call
                break
            peaks.append(y.abs().max().item())
    finite = bad is None and all(torch.isfinite(s).all() for s in iter_tensors(state) if s.is_floating_point())
    return StreamReport(name, scale, first, peaks, finite, bad)
