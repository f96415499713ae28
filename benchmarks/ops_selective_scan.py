"""CPU throughput of Mamba's selective scan: chunked vs sequential form, side by side.

Prints a markdown table of tokens/s (batch * T / seconds) for the forward pass and for
forward + backward, at T = 512 ... 8K, and the chunked / sequential ratio. Both forms run
in the same process, interleaved, and each cell is the best of ``--repeats`` runs (the
fastest run is the one least disturbed by other processes on a shared machine). The last
column checks that both computed the same thing: the largest difference between their
outputs (forward) or their input gradients (forward + backward), relative to the largest
magnitude of the sequential form's.

    python benchmarks/ops_selective_scan.py                       # defaults below
    python benchmarks/ops_selective_scan.py --lengths 512 2048 --d-inner 64 --repeats 5
    python benchmarks/ops_selective_scan.py --clock cpu           # on a busy shared machine
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from seqzoo.ops.selective_scan import selective_scan_chunked, selective_scan_sequential


def make_inputs(*, batch: int, d_inner: int, d_state: int, length: int, grad: bool,
                seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs shaped like a Mamba layer's (mamba-ssm layouts), Δ bias from the paper's range."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).requires_grad_(grad)

    dt = torch.exp(torch.rand(d_inner, generator=g) * (torch.log(torch.tensor(0.1)) - torch.log(torch.tensor(1e-3)))
                   + torch.log(torch.tensor(1e-3)))
    A_log = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).expand(d_inner, -1).contiguous()
    return dict(
        u=rnd(batch, d_inner, length), delta=rnd(batch, d_inner, length, scale=0.1),
        A=(-torch.exp(A_log)).requires_grad_(grad), B=rnd(batch, d_state, length),
        C=rnd(batch, d_state, length), D=torch.ones(d_inner).requires_grad_(grad),
        z=rnd(batch, d_inner, length),
        delta_bias=(dt + torch.log(-torch.expm1(-dt))).requires_grad_(grad),  # inverse softplus
    )


def run_once(fn: Callable, inputs: dict[str, torch.Tensor], backward: bool,
             clock: Callable[[], float]) -> tuple[float, list[torch.Tensor]]:
    """Seconds for one forward (+ backward), and its results: y, or every input's gradient."""
    for x in inputs.values():
        x.grad = None
    start = clock()
    y = fn(**inputs, delta_softplus=True)
    if backward:
        y.square().mean().backward()
    elapsed = clock() - start
    return elapsed, [x.grad for x in inputs.values()] if backward else [y]


def relative_difference(results: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    return max(((r - e).abs().max() / e.abs().max()).item() for r, e in zip(results, reference))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--d-inner", type=int, default=128, help="channels D (= expand * d_model)")
    parser.add_argument("--d-state", type=int, default=16, help="state size N")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: perf_counter; cpu: this process's CPU time (less sensitive to other "
                             "processes on a shared machine; equals wall time with 1 thread on an idle one)")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (1: steadiest on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    forms = {"sequential": selective_scan_sequential, "chunked": selective_scan_chunked}
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    print(f"selective_scan, CPU fp32, {args.threads} threads, B={args.batch}, D={args.d_inner}, "
          f"N={args.d_state}, default chunk; tokens/s by {args.clock} clock (best of {args.repeats})\n")
    print("| T | pass | sequential tok/s | chunked tok/s | chunked / sequential | max rel. difference |")
    print("|---:|---|---:|---:|---:|---:|")
    for length in args.lengths:
        for backward in (False, True):
            inputs = make_inputs(batch=args.batch, d_inner=args.d_inner, d_state=args.d_state,
                                 length=length, grad=backward)
            best = {name: float("inf") for name in forms}
            results = {}
            for _ in range(args.repeats):  # interleaved, so both forms see the same load
                for name, fn in forms.items():
                    with torch.set_grad_enabled(backward):
                        elapsed, results[name] = run_once(fn, inputs, backward, clock)
                    best[name] = min(best[name], elapsed)
            tokens = args.batch * length
            seq, chk = tokens / best["sequential"], tokens / best["chunked"]
            label = "fwd+bwd" if backward else "fwd"
            diff = relative_difference(results["chunked"], results["sequential"])
            print(f"| {length} | {label} | {seq:,.0f} | {chk:,.0f} | {chk / seq:.1f}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
