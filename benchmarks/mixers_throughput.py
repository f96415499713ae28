"""Tokens/s of every registered mixer, forward and forward+backward, across sequence lengths.

Prints a markdown table, and the ratio tokens/s(T_max) / tokens/s(T_min) per mixer: a
recurrent mixer whose training cost grows linearly with T keeps that ratio near 1; softmax
attention's falls. Every configuration runs side by side in the same process.

    python benchmarks/mixers_throughput.py                     # all mixers, T = 512 .. 4096
    python benchmarks/mixers_throughput.py --mixers titans mamba2 --lengths 1024 16384 --device cuda
"""

from __future__ import annotations

import argparse
import time

import torch

from seqzoo import mixers


def timed(fn, *, warmup: int, repeats: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def bench_mixer(name: str, *, d_model: int, batch: int, lengths: list[int], device: torch.device,
                dtype: torch.dtype, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    mixer = mixers.build(name, d_model=d_model).to(device=device, dtype=dtype)
    rows = []
    for t in lengths:
        x = torch.randn(batch, t, d_model, device=device, dtype=dtype)

        def fwd():
            with torch.no_grad():
                mixer(x)

        def fwd_bwd():
            xg = x.detach().requires_grad_()
            y, _ = mixer(xg)
            y.float().square().mean().backward()

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        f = timed(fwd, warmup=1, repeats=repeats, device=device)
        fb = timed(fwd_bwd, warmup=1, repeats=repeats, device=device)
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
        rows.append({"mixer": name, "backend": mixer.backend, "T": t, "fwd": batch * t / f,
                     "fwd_bwd": batch * t / fb, "peak_mb": peak})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mixers", nargs="*", help="default: every registered mixer")
    p.add_argument("--lengths", nargs="*", type=int, default=[512, 1024, 2048, 4096])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    names = args.mixers or mixers.available()
    print(f"device={device} dtype={args.dtype} B={args.batch} d_model={args.d_model} threads={torch.get_num_threads()}\n")
    print("| mixer | backend | T | fwd tokens/s | fwd+bwd tokens/s | peak MB |")
    print("|---|---|---:|---:|---:|---:|")
    summary = []
    for name in names:
        try:
            rows = bench_mixer(name, d_model=args.d_model, batch=args.batch, lengths=args.lengths,
                               device=device, dtype=dtype, repeats=args.repeats)
        except Exception as err:  # noqa: BLE001 - report and go on with the others
            print(f"| {name} | failed: {type(err).__name__}: {err} | | | | |")
            continue
        for r in rows:
            print(f"| {r['mixer']} | {r['backend']} | {r['T']} | {r['fwd']:,.0f} | {r['fwd_bwd']:,.0f} | {r['peak_mb']:.0f} |", flush=True)
        summary.append((name, rows[-1]["fwd_bwd"] / rows[0]["fwd_bwd"]))
    print(f"\n| mixer | fwd+bwd tokens/s at T={args.lengths[-1]} ÷ at T={args.lengths[0]} |")
    print("|---|---:|")
    for name, ratio in summary:
        print(f"| {name} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
