"""The GPU check: every kernel backend against its pure-PyTorch reference, then the
throughput table, in one run (about 8 minutes on one H100 / H200; ``--quick`` about 3).

1. Parity, per mixer and kernel backend that runs here, same weights: the output of a
   forward chained across a split (states through the kernel), the final state and the
   gradient of every parameter.
   fp32: allclose at rtol = atol = 1e-4 (the suite's fp32 tolerance, DESIGN.md section 3).
   bf16 (autocast, fp32 weights): judged as the kernel libraries judge it, by the relative
   error of the whole tensor, ||kernel - ref_fp32|| / ||ref_fp32||, which must stay below
   max(1e-2, 2 x the reference's own bf16 error on the same input).
2. Throughput: every registered mixer, reference vs each kernel backend, T = 2K .. 16K,
   forward and forward+backward, tokens/s and peak memory (torch.cuda.max_memory_allocated),
   side by side in this process. Rows past ``--budget-s`` are skipped and say so.

    python benchmarks/gpu_check.py                 # CUDA: the whole check
    python benchmarks/gpu_check.py --quick         # CUDA: T = 2K, 8K; bf16 parity; auto backends only
    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --dry-run   # CPU: tiny sizes, fla interpreted

The exit status is 1 when a parity check fails.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.mixers_throughput import timed  # noqa: E402
from seqzoo import mixers  # noqa: E402
from seqzoo.kernels import is_available  # noqa: E402
from seqzoo.mixers.base import iter_tensors  # noqa: E402

# Small real configurations per mixer (head dims 64-128 on a GPU); d_model is set by the run.
PARAMS = {
    "attention": {"n_heads": 8}, "retnet": {"n_heads": 8}, "gla": {"n_heads": 8},
    "deltanet": {"n_heads": 8}, "gated_deltanet": {"n_heads": 8}, "mamba": {},
    "mamba2": {"headdim": 64, "d_state": 64}, "titans": {"n_heads": 8},
    "titans_mac": {"n_heads": 8}, "titans_mag": {"n_heads": 8}, "titans_mal": {"n_heads": 8},
    "ttt_linear": {"n_heads": 8}, "ttt_mlp": {"n_heads": 8},
}


@dataclass
class Parity:
    mixer: str
    backend: str
    dtype: str
    worst: str  # the tensor with the largest error
    error: float  # fp32: max |kernel - ref|; bf16: whole-tensor relative error
    limit: float
    passed: bool


def _build(name: str, backend: str, d_model: int, device: torch.device, small: bool):
    params = dict(PARAMS.get(name, {}))
    if small:  # CPU dry run: head dims 16
        params = {k: (2 if k == "n_heads" else 16 if k in ("headdim", "d_state") else v) for k, v in params.items()}
    torch.manual_seed(0)
    return mixers.build(name, d_model=d_model, backend=backend, **params).to(device)


def _run(mixer, x: torch.Tensor, split: int, bf16: bool):
    """Chained forward (two calls, the state in between) and parameter gradients."""
    mixer.zero_grad(set_to_none=True)
    ctx = torch.autocast(x.device.type, dtype=torch.bfloat16) if bf16 else torch.autocast(x.device.type, enabled=False)
    with ctx:
        y1, state = mixer(x[:, :split])
        y2, state = mixer(x[:, split:], state)
        y = torch.cat([y1, y2], 1).float()
    (y * torch.linspace(-1, 1, y.shape[-1], device=y.device)).sum().backward()
    grads = {n: p.grad.float() for n, p in mixer.named_parameters() if p.grad is not None}
    states = {f"state[{i}]": s.float() for i, s in enumerate(iter_tensors(state)) if s.is_floating_point()}
    return {"output": y.detach(), **{k: v.detach() for k, v in states.items()}, **grads}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def parity(name: str, backend: str, *, d_model: int, length: int, device: torch.device, small: bool,
           dtypes: list[str]) -> list[Parity]:
    reference = _build(name, "reference", d_model, device, small)
    kernel = _build(name, backend, d_model, device, small)
    kernel.load_state_dict(reference.state_dict())
    assert kernel.backend == backend, f"{name}: asked for {backend}, runs {kernel.backend}"
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(2, length, d_model, generator=g).to(device)
    split = length // 3 + 5
    ref32 = _run(reference, x, split, bf16=False)
    out = []
    for dtype in dtypes:
        got = _run(kernel, x, split, bf16=dtype == "bf16")
        if dtype == "fp32":
            errs = {k: float((got[k] - v).abs().max()) for k, v in ref32.items()}
            ok = {k: bool(torch.allclose(got[k], v, rtol=1e-4, atol=1e-4)) for k, v in ref32.items()}
            worst = max(errs, key=errs.get)
            out.append(Parity(name, backend, dtype, worst, errs[worst], 1e-4, all(ok.values())))
        else:
            ref16 = _run(reference, x, split, bf16=True)
            errs = {k: _rel(got[k], v) for k, v in ref32.items()}
            limits = {k: max(1e-2, 2 * _rel(ref16[k], v)) for k, v in ref32.items()}
            worst = max(errs, key=lambda k: errs[k] / limits[k])
            out.append(Parity(name, backend, dtype, worst, errs[worst], limits[worst],
                              all(errs[k] <= limits[k] for k in errs)))
    return out


def throughput(name: str, backend: str, *, d_model: int, length: int, device: torch.device, small: bool,
               repeats: int) -> dict:
    mixer = _build(name, backend, d_model, device, small)
    x = torch.randn(1, length, d_model, device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def fwd():
        with torch.no_grad(), amp:
            mixer(x)

    def fwd_bwd():
        with amp:
            y, _ = mixer(x.detach().requires_grad_())
        y.float().square().mean().backward()

    row = {"mixer": name, "backend": mixer.backend, "T": length}
    for label, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        row[label] = length / timed(fn, warmup=1, repeats=repeats, device=device)
        row[f"{label}_mb"] = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else math.nan
    return row


def kernel_backends(name: str, device: torch.device, *, d_model: int, small: bool, auto_only: bool) -> list[str]:
    """The mixer's kernel backends that run here (``auto_only``: the one ``auto`` picks)."""
    usable = [b for b in mixers.get(name).backends if is_available(b, device)]
    if not auto_only:
        return usable
    chosen = _build(name, "auto", d_model, device, small).backend
    return [chosen] if chosen != "reference" else usable[:1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="about 3 minutes: T = 2K, 8K, bf16 parity, auto backends")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: the parity logic on what runs here")
    p.add_argument("--mixers", nargs="*", help="default: every registered mixer")
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--lengths", nargs="*", type=int)
    p.add_argument("--budget-s", type=float, help="stop timing new rows after this many seconds")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("no CUDA device: nothing measured (use --dry-run to exercise the checks on CPU)")
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    small = not cuda
    d_model = 32 if small else args.d_model
    lengths = args.lengths or ([64] if small else [2048, 8192] if args.quick else [2048, 4096, 8192, 16384])
    budget = args.budget_s if args.budget_s is not None else 20 if small else 150 if args.quick else 420
    names = args.mixers or mixers.available()
    start = time.perf_counter()
    print(f"device={torch.cuda.get_device_name() if cuda else 'cpu (dry run)'} torch={torch.__version__} "
          f"d_model={d_model}\n\n## Parity: kernel vs reference, same weights\n")
    print("| mixer | backend | dtype | worst tensor | error | limit | result |\n|---|---|---|---|---:|---:|---|")
    failed = False
    parity_dtypes = ["bf16"] if args.quick and not small else ["fp32", "bf16"]
    for name in names:
        for backend in kernel_backends(name, device, d_model=d_model, small=small, auto_only=False):
            try:
                results = parity(name, backend, d_model=d_model, length=70 if small else 1000, device=device,
                                 small=small, dtypes=parity_dtypes)
            except Exception as err:  # noqa: BLE001 - a crash is a failed check, reported in the table
                failed = True
                print(f"| {name} | {backend} | | | | | FAIL: {type(err).__name__}: {str(err)[:120]} |", flush=True)
                continue
            for r in results:
                failed |= not r.passed
                print(f"| {r.mixer} | {r.backend} | {r.dtype} | {r.worst} | {r.error:.2e} | {r.limit:.0e} | "
                      f"{'pass' if r.passed else 'FAIL'} |", flush=True)
    print(f"\n## Throughput (batch 1, d_model={d_model}, {'bf16 autocast' if cuda else 'fp32'})\n")
    print("| mixer | backend | T | fwd tok/s | fwd peak MB | fwd+bwd tok/s | fwd+bwd peak MB |\n"
          "|---|---|---:|---:|---:|---:|---:|")
    for name in names:
        for backend in ["reference", *kernel_backends(name, device, d_model=d_model, small=small, auto_only=args.quick)]:
            for length in lengths:
                if time.perf_counter() - start > budget:
                    print(f"| {name} | {backend} | {length} | skipped: past the {budget:.0f} s budget | | | |")
                    continue
                try:
                    r = throughput(name, backend, d_model=d_model, length=length, device=device, small=small,
                                   repeats=1 if small else 2)
                except torch.cuda.OutOfMemoryError:
                    print(f"| {name} | {backend} | {length} | out of memory | | | |", flush=True)
                    continue
                print(f"| {name} | {r['backend']} | {length} | {r['fwd']:,.0f} | {r['fwd_mb']:,.0f} | "
                      f"{r['fwd_bwd']:,.0f} | {r['fwd_bwd_mb']:,.0f} |", flush=True)
    print(f"\n{time.perf_counter() - start:.0f} s; parity {'FAILED' if failed else 'passed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
