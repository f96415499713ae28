"""CPU throughput of the delta rule and the gated delta rule: chunked (WY/UT) vs recurrent
forms side by side, and the gated chunked form vs flash-linear-attention's own naive chunk
reference (``fla.ops.gated_delta_rule.naive.naive_chunk_gated_delta_rule``) on the same shapes.

Prints markdown tables of tokens/s (batch * T / seconds), forward and forward + backward, at
T = 512 ... 8K with the chunked / recurrent ratio. The forms run in the same process,
interleaved, and each cell is the best of ``--repeats`` runs (the fastest run is the one
least disturbed by other processes on a shared machine).

    python benchmarks/ops_delta_rule.py                                  # defaults below
    python benchmarks/ops_delta_rule.py --lengths 512 2048 --repeats 5 --threads 1
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
import torch.nn.functional as F

from seqzoo.ops.delta_rule import delta_rule_chunked, delta_rule_recurrent
from seqzoo.ops.gated_delta_rule import gated_delta_rule_chunked, gated_delta_rule_recurrent

Inputs = dict[str, torch.Tensor]


def make_inputs(*, batch: int, length: int, heads: int, dim: int, grad: bool, seed: int = 0) -> Inputs:
    """Inputs as the layers produce them: L2-normalised keys, β ∈ (0, 1), log decay of
    Gated DeltaNet's initial range (−A·Δ with A ∈ (0, 16), Δ ∈ (0.001, 0.1))."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, length, heads, dim)
    tensors = dict(
        q=torch.randn(*shape, generator=gen),
        k=F.normalize(torch.randn(*shape, generator=gen), dim=-1),
        v=torch.randn(*shape, generator=gen),
        beta=torch.rand(batch, length, heads, generator=gen),
        g=-torch.rand(batch, length, heads, generator=gen) * 16 * 0.05,
    )
    return {name: t.requires_grad_(grad) for name, t in tensors.items()}


def call(form: str, fn: Callable, x: Inputs, *, chunk_size: int) -> torch.Tensor:
    """Every form here takes (q, k, v, [g,] beta); the chunked ones also a chunk size."""
    gated = "gated" in form or form.startswith("fla")
    args = (x["q"], x["k"], x["v"], *((x["g"],) if gated else ()), x["beta"])
    kwargs = {} if "recurrent" in form else {"chunk_size": chunk_size}
    return fn(*args, **kwargs)[0]


def run_once(form: str, fn: Callable, x: Inputs, *, backward: bool, chunk_size: int) -> float:
    start = time.perf_counter()
    with torch.set_grad_enabled(backward):
        o = call(form, fn, x, chunk_size=chunk_size)
        if backward:
            o.square().mean().backward()
    elapsed = time.perf_counter() - start
    for t in x.values():
        t.grad = None
    return elapsed


def best_times(forms: dict[str, Callable], x: Inputs, *, backward: bool, repeats: int,
               chunk_size: int) -> dict[str, float]:
    best = {name: float("inf") for name in forms}
    for _ in range(repeats):  # interleaved, so every form sees the same load
        for name, fn in forms.items():
            best[name] = min(best[name], run_once(name, fn, x, backward=backward, chunk_size=chunk_size))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64, help="head dim K = V")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setup = (f"CPU fp32, {args.threads} threads, B={args.batch}, H={args.heads}, K=V={args.dim}, "
             f"chunk={args.chunk_size}")

    ops = {
        "delta_rule": {"recurrent": delta_rule_recurrent, "chunked": delta_rule_chunked},
        "gated_delta_rule": {"gated recurrent": gated_delta_rule_recurrent,
                             "gated chunked": gated_delta_rule_chunked},
    }
    for op, forms in ops.items():
        rec, chk = forms
        print(f"\n{op}, {setup}; tokens/s (best of {args.repeats})\n")
        print("| T | pass | recurrent tok/s | chunked tok/s | chunked / recurrent |")
        print("|---:|---|---:|---:|---:|")
        for length in args.lengths:
            for backward in (False, True):
                x = make_inputs(batch=args.batch, length=length, heads=args.heads, dim=args.dim, grad=backward)
                best = best_times(forms, x, backward=backward, repeats=args.repeats, chunk_size=args.chunk_size)
                tokens = args.batch * length
                r, c = tokens / best[rec], tokens / best[chk]
                label = "fwd+bwd" if backward else "fwd"
                print(f"| {length} | {label} | {r:,.0f} | {c:,.0f} | {c / r:.1f}x |", flush=True)

    try:
        from fla.ops.gated_delta_rule.naive import naive_chunk_gated_delta_rule
    except Exception as err:  # noqa: BLE001 - flash-linear-attention (and triton) are optional
        print(f"\nflash-linear-attention not importable ({type(err).__name__}); fla comparison skipped")
        return
    length = 2048
    print(f"\ngated_delta_rule vs fla naive_chunk_gated_delta_rule, T={length}, {setup}; "
          f"seconds (best of {args.repeats})\n")
    print("| pass | fla naive chunk s | seqzoo chunked s | fla / seqzoo |")
    print("|---|---:|---:|---:|")
    forms = {"fla naive chunk": naive_chunk_gated_delta_rule, "gated chunked": gated_delta_rule_chunked}
    for backward in (False, True):
        x = make_inputs(batch=args.batch, length=length, heads=args.heads, dim=args.dim, grad=backward)
        best = best_times(forms, x, backward=backward, repeats=args.repeats, chunk_size=args.chunk_size)
        label = "fwd+bwd" if backward else "fwd"
        fla_s, ours = best["fla naive chunk"], best["gated chunked"]
        print(f"| {label} | {fla_s:.3f} | {ours:.3f} | {fla_s / ours:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
