"""seqzoo's Titans memory vs titans-pytorch's NeuralMemory, side by side in one run (CPU).

    python benchmarks/titans_vs_titans_pytorch.py [--repeats 3] [--threads N] [--max-t 16384]

Config (issue 3): B 2, T 1024, d 256, one head of 256, chunk 64, memory MLP depth 2 x
expansion 4. seqzoo: the ``titans`` mixer (projections, conv, gates, memory, output gate),
computing the faithful per-token recurrence (gradients at chunk-start weights, momentum and
forgetting per token, read-out with each token's weights). titans-pytorch: ``NeuralMemory``
with the same sizes and its defaults (an optional dependency: ``pip install titans-pytorch``).

Prints markdown tables: tokens/s forward (no grad) and forward+backward, their ratio and the
peak memory of each (growth of the resident set over the call, measured in a fresh child
process per case so one case's freed pages cannot hide another's); seqzoo's chunked op vs
its per-token loops; seqzoo's tokens/s across T. Times are the best of ``--repeats``
interleaved runs (the machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

B, T, D, CHUNK, DEPTH, EXPANSION = 2, 1024, 256, 64, 2, 4


def build_seqzoo(chunk: int = CHUNK) -> torch.nn.Module:
    from seqzoo import mixers

    return mixers.build("titans", d_model=D, n_heads=1, depth=DEPTH, expansion=EXPANSION, chunk_size=chunk)


def build_titans_pytorch() -> torch.nn.Module | None:
    try:
        from titans_pytorch import NeuralMemory
    except ImportError:
        return None
    return NeuralMemory(dim=D, chunk_size=CHUNK, heads=1, dim_head=D,
                        default_model_kwargs=dict(depth=DEPTH, expansion_factor=float(EXPANSION)))


def run(module: torch.nn.Module, x: torch.Tensor, backward: bool) -> None:
    if backward:
        y = module(x)[0]
        y.square().mean().backward()
        module.zero_grad(set_to_none=True)
    else:
        with torch.no_grad():
            module(x)


CLOCK: Callable[[], float] = time.perf_counter


def best_time(fn: Callable[[], None], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = CLOCK()
        fn()
        best = min(best, CLOCK() - start)
    return best


# -- peak memory in a child process ----------------------------------------------------------
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(field)


def _child(impl: str, backward: bool, t: int) -> None:
    torch.manual_seed(0)
    module = build_seqzoo() if impl == "seqzoo" else build_titans_pytorch()
    x = torch.randn(B, t, D)
    before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark (Linux >= 4.0)
        f.write("5")
    run(module, x, backward)
    print(json.dumps({"peak_mib": (_rss_kib("VmHWM") - before) / 1024}))


def peak_memory(impl: str, backward: bool, t: int = T) -> float | None:
    cmd = [sys.executable, __file__, "--child", impl, str(int(backward)), str(t)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        print(out.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


# -- tables ----------------------------------------------------------------------------------
def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def fmt(x: float | None, spec: str = ",.0f") -> str:
    return "n/a" if x is None else format(x, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--max-t", type=int, default=16384)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: process CPU time (with --threads 1, robust on a shared, overloaded machine)")
    parser.add_argument("--sections", default="compare,loop,sweep", help="comma list of compare, loop, sweep")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    sections = set(args.sections.split(","))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        impl, backward, t = args.child
        _child(impl, bool(int(backward)), int(t))
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, B={B} T={T} d={D} "
          f"heads=1 chunk={CHUNK} memory depth={DEPTH} expansion={EXPANSION}, best of {args.repeats}\n")
    torch.manual_seed(0)
    ours = build_seqzoo()
    theirs = build_titans_pytorch()
    x = torch.randn(B, T, D)
    tokens = B * T

    if "compare" in sections:
        # 1) side by side
        rows = []
        for backward, label in ((False, "forward"), (True, "forward+backward")):
            run(ours, x, backward)  # warm-up
            if theirs is not None:
                run(theirs, x, backward)
            t_ours, t_theirs = float("inf"), float("inf")
            for _ in range(args.repeats):  # interleaved, so both see the same machine state
                t_ours = min(t_ours, best_time(lambda: run(ours, x, backward), 1))
                if theirs is not None:
                    t_theirs = min(t_theirs, best_time(lambda: run(theirs, x, backward), 1))
            m_ours, m_theirs = peak_memory("seqzoo", backward), peak_memory("titans-pytorch", backward) if theirs else None
            tps_ours, tps_theirs = tokens / t_ours, (tokens / t_theirs if theirs is not None else None)
            rows.append([label, fmt(tps_ours), fmt(tps_theirs), fmt(tps_ours / tps_theirs if tps_theirs else None, ".2f") + "x",
                         fmt(m_ours, ",.1f"), fmt(m_theirs, ",.1f"),
                         fmt(m_ours / m_theirs if (m_ours and m_theirs) else None, ".2f") + "x"])
        print("### seqzoo titans vs titans-pytorch NeuralMemory" + ("" if theirs else " (titans-pytorch not installed)"))
        print(table(["pass", "seqzoo tok/s", "titans-pytorch tok/s", "speed ratio", "seqzoo peak MiB",
                     "titans-pytorch peak MiB", "memory ratio"], rows))

    if "loop" in sections:
        # 2) chunked op vs per-token loops (same maths: gradients at chunk-start weights)
        from seqzoo.ops.titans import titans_memory
        from seqzoo.ops.titans_naive import titans_memory_naive

        g = torch.Generator().manual_seed(0)
        q, k = (F.normalize(torch.randn(B, T, 1, D, generator=g), dim=-1) for _ in range(2))
        v = torch.randn(B, T, 1, D, generator=g)
        theta, eta, alpha = 0.002 * torch.rand(B, T, 1), 0.9 * torch.ones(B, T, 1), 0.001 * torch.ones(B, T, 1)
        weights = [torch.randn(B, 1, D, D * EXPANSION) / D ** 0.5, torch.randn(B, 1, D * EXPANSION, D) / (D * EXPANSION) ** 0.5]
        cases = [
            (f"chunked op, chunk {CHUNK}", lambda: titans_memory(q, k, v, theta, eta, alpha, weights, chunk_size=CHUNK), T),
            ("chunked op, chunk 1 (eq. 13-14 token recurrence)",
             lambda: titans_memory(q, k, v, theta, eta, alpha, weights, chunk_size=1), T),
        ]
        short = 128  # the autograd token loop is slow; its tokens/s is measured on a prefix
        cases.append((f"naive token loop (torch.func), chunk {CHUNK}, T={short}",
                      lambda: titans_memory_naive(*(z[:, :short] for z in (q, k, v, theta, eta, alpha)), weights,
                                                  chunk_size=CHUNK), short))
        rows = []
        with torch.no_grad():
            for label, fn, t in cases:
                fn()
                rows.append([label, fmt(B * t / best_time(fn, args.repeats))])
        print("\n### seqzoo memory op, forward (no grad)")
        print(table(["path", "tok/s"], rows))

    if "sweep" in sections:
        # 3) tokens/s across T (linear cost: tokens/s should stay flat)
        rows, ref = [], {}
        t_len = 512
        while t_len <= args.max_t:
            xt = torch.randn(B, t_len, D)
            row = [str(t_len)]
            for backward in (False, True):
                if t_len == 512:  # warm-up once
                    run(ours, xt, backward)
                tps = B * t_len / best_time(lambda: run(ours, xt, backward), args.repeats)
                ref.setdefault(backward, {})[t_len] = tps
                row.append(fmt(tps))
            rows.append(row)
            t_len *= 2
        for row in rows:
            t_len = int(row[0])
            row += [fmt(ref[b][t_len] / ref[b][1024], ".2f") + "x" if 1024 in ref[b] else "n/a" for b in (False, True)]
        print(f"\n### seqzoo titans across T (B={B})")
        print(table(["T", "forward tok/s", "fwd+bwd tok/s", "forward vs T=1K", "fwd+bwd vs T=1K"], rows))


if __name__ == "__main__":
    main()
