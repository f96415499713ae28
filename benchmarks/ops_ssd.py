"""CPU throughput of Mamba2's SSD: chunked vs sequential form, side by side.

Prints a markdown table of tokens/s (batch * T / seconds) for the forward pass and for
forward + backward, at T = 512 ... 8K, and the chunked / sequential ratio. Both forms run
in the same process, interleaved per cell, and each cell is the best of ``--repeats`` runs
(the run least disturbed by other processes on a shared machine). Shapes default to one
Mamba2 layer at d_model = 256 (expand 2, head dim 64 -> 8 heads, d_state 64, one group).

    python benchmarks/ops_ssd.py
    python benchmarks/ops_ssd.py --lengths 512 2048 --chunk-size 128 --repeats 5
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Callable

import torch
import torch.nn.functional as F

from seqzoo.ops.ssd import ssd, ssd_sequential


def make_inputs(*, batch: int, length: int, heads: int, headdim: int, groups: int, d_state: int,
                grad: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs shaped like a Mamba2 layer's, dt from the paper's initial range, A from U(1, 16)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).requires_grad_(grad)

    log_dt = torch.rand(heads, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)
    dt = F.softplus(torch.randn(batch, length, heads, generator=g) * 0.1 + log_dt.exp().expm1().log())
    return dict(
        x=rnd(batch, length, heads, headdim), dt=dt.requires_grad_(grad),
        A=(-(1 + 15 * torch.rand(heads, generator=g))).requires_grad_(grad),
        B=rnd(batch, length, groups, d_state), C=rnd(batch, length, groups, d_state),
        D=torch.ones(heads).requires_grad_(grad),
    )


def run_once(fn: Callable, inputs: dict[str, torch.Tensor], backward: bool) -> float:
    start = time.perf_counter()
    y, state = fn(**inputs)
    if backward:
        (y.square().mean() + state.square().mean()).backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--headdim", type=int, default=64)
    parser.add_argument("--groups", type=int, default=1)
    parser.add_argument("--d-state", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    forms: dict[str, Callable] = {
        "sequential": lambda **kw: ssd_sequential(**kw, output_final_state=True),
        "chunked": lambda **kw: ssd(**kw, chunk_size=args.chunk_size, output_final_state=True),
    }
    shape = dict(batch=args.batch, heads=args.heads, headdim=args.headdim, groups=args.groups,
                 d_state=args.d_state)
    print(f"SSD on CPU ({args.threads} threads), fp32, B={args.batch} H={args.heads} P={args.headdim} "
          f"G={args.groups} N={args.d_state}, chunk {args.chunk_size}, best of {args.repeats}\n")
    print("| T | pass | sequential tok/s | chunked tok/s | chunked / sequential |")
    print("|---:|---|---:|---:|---:|")
    for length in args.lengths:
        for backward in (False, True):
            best = {name: math.inf for name in forms}
            for _ in range(args.repeats):
                for name, fn in forms.items():  # interleaved: both see the same machine load
                    inputs = make_inputs(length=length, grad=backward, **shape)
                    with torch.set_grad_enabled(backward):
                        best[name] = min(best[name], run_once(fn, inputs, backward))
            tok = {name: args.batch * length / s for name, s in best.items()}
            print(f"| {length} | {'fwd+bwd' if backward else 'fwd'} | {tok['sequential']:,.0f} "
                  f"| {tok['chunked']:,.0f} | {tok['chunked'] / tok['sequential']:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
