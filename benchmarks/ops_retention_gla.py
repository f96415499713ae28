"""CPU throughput of retention and gated linear attention: chunked vs recurrent forms side
by side (seqzoo.ops.retention, seqzoo.ops.gla), plus flash-linear-attention's naive chunk
reference of scalar-gated attention (``naive_chunk_simple_gla``, which computes retention when
given its fixed decays) on the same shapes when fla is installed.

Prints a markdown table of tokens/s (batch * T / seconds), forward and forward + backward, at
T = 512 ... 8K, with the chunked / recurrent ratio (the issue's target: >= 5x at T = 2048).
GLA's chunked form is timed twice: as ``gla`` runs it ("auto", here the factored in-chunk
matmul) and forced onto secondary chunking, its fallback for gates too steep to factor.
All forms run in one process, interleaved; each cell is the best of ``--repeats`` runs (the
fastest run is the one least disturbed by other processes on a shared machine).

    python benchmarks/ops_retention_gla.py                                 # defaults below
    python benchmarks/ops_retention_gla.py --lengths 512 2048 --repeats 5 --threads 1
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

from seqzoo.ops.gla import gla_chunked, gla_recurrent
from seqzoo.ops.retention import retention, retention_recurrent

Inputs = dict[str, torch.Tensor]


def make_inputs(*, batch: int, length: int, heads: int, dim: int, grad: bool, seed: int = 0) -> Inputs:
    """q, k, v and GLA's log gates as the layer makes them: logsigmoid(.) / 16."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, length, heads, dim)
    tensors = dict(
        q=torch.randn(*shape, generator=gen), k=torch.randn(*shape, generator=gen),
        v=torch.randn(*shape, generator=gen),
        g=F.logsigmoid(torch.randn(*shape, generator=gen)) / 16,
    )
    return {name: t.requires_grad_(grad) for name, t in tensors.items()}


def _fla_retention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, chunk_size: int):
    from fla.ops.simple_gla.naive import naive_chunk_simple_gla

    b, t, h, _ = q.shape
    g = torch.tensor([math.log(1 - 2.0 ** (-5 - i)) for i in range(h)]).expand(b, t, h)
    return naive_chunk_simple_gla(q, k, v, g, chunk_size=chunk_size)


def forms(with_fla: bool) -> dict[str, dict[str, Callable]]:
    """op -> form name -> fn(inputs, chunk_size) -> output."""
    table = {
        "retention": {
            "chunked": lambda x, c: retention(x["q"], x["k"], x["v"], chunk_size=c)[0],
            "recurrent": lambda x, c: retention_recurrent(x["q"], x["k"], x["v"])[0],
        },
        "gla": {
            "chunked": lambda x, c: gla_chunked(x["q"], x["k"], x["v"], x["g"], chunk_size=c)[0],
            "chunked, secondary": lambda x, c: gla_chunked(x["q"], x["k"], x["v"], x["g"], chunk_size=c,
                                                           intra="secondary")[0],
            "recurrent": lambda x, c: gla_recurrent(x["q"], x["k"], x["v"], x["g"])[0],
        },
    }
    if with_fla:
        table["retention"]["fla naive chunk"] = lambda x, c: _fla_retention(x["q"], x["k"], x["v"], chunk_size=c)[0]
    return table


def run_once(fn: Callable, x: Inputs, *, backward: bool, chunk_size: int) -> float:
    start = time.perf_counter()
    with torch.set_grad_enabled(backward):
        o = fn(x, chunk_size)
        if backward:
            o.square().mean().backward()
    elapsed = time.perf_counter() - start
    for t in x.values():
        t.grad = None
    return elapsed


def fla_available() -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import fla.ops.simple_gla.naive  # noqa: F401
    except Exception:  # noqa: BLE001 - fla or triton missing: skip its column
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64, help="head dim K = V")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-fla", action="store_true", help="skip flash-linear-attention's naive reference")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    table = forms(with_fla=not args.no_fla and fla_available())
    print(f"B={args.batch} H={args.heads} K=V={args.dim} chunk={args.chunk_size} fp32, "
          f"threads={torch.get_num_threads()}, best of {args.repeats}; tokens/s (higher is better)\n")
    columns = ("chunked", "chunked, secondary", "recurrent", "fla naive chunk")
    print("| op | T | pass | " + " | ".join(columns) + " | chunked / recurrent |")
    print("|---|---:|---|" + "---:|" * (len(columns) + 1))
    for fns in table.values():  # warm-up (first-call allocations, lazy imports), untimed
        for backward in (False, True):
            x = make_inputs(batch=args.batch, length=2 * args.chunk_size, heads=args.heads, dim=args.dim,
                            grad=backward)
            for fn in fns.values():
                run_once(fn, x, backward=backward, chunk_size=args.chunk_size)
    for op, fns in table.items():
        for length in args.lengths:
            for backward in (False, True):
                x = make_inputs(batch=args.batch, length=length, heads=args.heads, dim=args.dim, grad=backward)
                best = {name: math.inf for name in fns}
                for _ in range(args.repeats):
                    for name, fn in fns.items():  # interleaved: each repeat times every form
                        best[name] = min(best[name], run_once(fn, x, backward=backward, chunk_size=args.chunk_size))
                tps = {name: args.batch * length / sec for name, sec in best.items()}
                cells = [f"{tps[name]:,.0f}" if name in tps else "-" for name in columns]
                ratio = tps["chunked"] / tps["recurrent"]
                print(f"| {op} | {length} | {'fwd+bwd' if backward else 'fwd'} | " + " | ".join(cells)
                      + f" | {ratio:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
