"""seqzoo's Titans memory vs titans-pytorch's NeuralMemory, side by side in one run (CPU).

    python benchmarks/titans_vs_titans_pytorch.py [--rounds 3] [--threads N] [--max-t 16384]
    python benchmarks/titans_vs_titans_pytorch.py --sections sweep --malloc-tuned
    python benchmarks/titans_vs_titans_pytorch.py --sections compare --inner plain   # the paper's plain MLP memory
    # a speed regression check: seqzoo at another commit timed in the same run, e.g. the code
    # issue 11 started from, whose only (default) memory was the plain MLP
    git worktree add ../seqzoo-base 3bbeddb
    python benchmarks/titans_vs_titans_pytorch.py --sections compare --inner plain \
        --baseline ../seqzoo-base --baseline-inner default

Config (issue 3): B 2, T 1024, d 256, one head of 256, chunk 64, memory MLP depth 2 x
expansion 4. seqzoo: the ``titans`` mixer (projections, conv, gates, memory as its default
x + LN(MLP(x)) or, with ``--inner plain``, the paper's plain MLP; output gate),
computing the faithful per-token recurrence (gradients at chunk-start weights, momentum and
forgetting per token, read-out with each token's weights). titans-pytorch: ``NeuralMemory``
with the same sizes and its defaults (an optional dependency: ``pip install titans-pytorch``).

How it measures. Every timing runs in a fresh child process that builds the module, warms
it up, then keeps the best of ``--repeats`` calls: the steady state of a training loop. The
children of the two implementations alternate (A, B, A, B, ... ``--rounds`` times, best
kept), so both see the same machine. Timing both in one process interleaved is unfair on
CPU: each call's freed memory is handed back to the OS by glibc and the other call then pays
page faults for it (on this machine that halved titans-pytorch's measured speed). The page
faults per call are printed so that this stays visible. Peak memory is the growth of the
resident set over one call, also in a fresh child.

``--malloc-tuned`` runs the children with glibc told to keep freed memory
(MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_): tensors of 32 MB and more are otherwise
mapped afresh on every call, which at T = 16K costs page faults in any PyTorch model.

``--baseline DIR`` also times the seqzoo package of another checkout DIR (its children import
seqzoo from DIR), alternating with the others, and prints a table of this checkout vs that one.
``--baseline-inner`` picks its memory (``default``: that checkout's own default).

Prints markdown tables: tokens/s forward (no grad) and forward+backward with their ratio
and peak memory; seqzoo's chunked op vs its per-token loops; seqzoo's tokens/s across T.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

B, T, D, CHUNK, DEPTH, EXPANSION = 2, 1024, 256, 64, 2, 4
IMPLS = ("seqzoo", "seqzoo-chunk-start", "titans-pytorch")  # seqzoo with read="chunk_start" too
BASELINE_IMPLS = ("baseline", "baseline-chunk-start")  # seqzoo of the --baseline checkout
# seqzoo's inner model: its default M(x) = x + LN(MLP(x)) (titans-pytorch's default wraps its MLP
# the same way, in ResidualNorm) or the paper's plain MLP (``--inner plain``).
INNER_MODELS = {"default": {}, "plain": {"residual": False, "memory_norm": "none"}}
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(2 ** 30), "MALLOC_TRIM_THRESHOLD_": str(2 ** 34)}


def build(impl: str, chunk: int = CHUNK, inner: str = "default") -> torch.nn.Module | None:
    if impl.startswith("seqzoo"):
        from seqzoo import mixers

        read = "chunk_start" if impl == "seqzoo-chunk-start" else "token"
        return mixers.build("titans", d_model=D, n_heads=1, depth=DEPTH, expansion=EXPANSION, chunk_size=chunk,
                            read=read, **INNER_MODELS[inner])
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


# -- children ----------------------------------------------------------------------------------
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(field)


def _child(task: str, impl: str, backward: bool, t: int, repeats: int, threads: int | None, inner: str) -> dict:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    module = build(impl, inner=inner)
    x = torch.randn(B, t, D)
    if task == "memory":
        before = _rss_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark (Linux >= 4.0)
            f.write("5")
        run(module, x, backward)
        return {"peak_mib": (_rss_kib("VmHWM") - before) / 1024}
    run(module, x, backward)  # warm-up: first-call allocations, lazy initialisation
    best, faults = float("inf"), []
    for _ in range(repeats):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        run(module, x, backward)
        best = min(best, time.perf_counter() - start)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return {"seconds": best, "faults": min(faults)}


def child(task: str, impl: str, backward: bool, t: int, args: argparse.Namespace) -> dict | None:
    """One fresh process timing (or measuring the memory of) ``impl``; a ``baseline-*`` impl is
    seqzoo imported from the ``--baseline`` checkout."""
    inner, root = args.inner, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if impl.startswith("baseline"):
        impl, inner, root = impl.replace("baseline", "seqzoo", 1), args.baseline_inner, os.path.abspath(args.baseline)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", task, impl, str(int(backward)), str(t),
           "--repeats", str(args.repeats), "--inner", inner]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    if args.malloc_tuned:
        env.update(TUNED_MALLOC)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        print(out.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def timed(impl: str, backward: bool, t: int, args: argparse.Namespace, rounds: int) -> tuple[float, int] | None:
    """Best (seconds, page faults per call) over ``rounds`` fresh children."""
    results = [r for r in (child("time", impl, backward, t, args) for _ in range(rounds)) if r]
    if not results:
        return None
    best = min(results, key=lambda r: r["seconds"])
    return best["seconds"], best["faults"]


# -- tables ------------------------------------------------------------------------------------
def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def fmt(x: float | None, spec: str = ",.0f") -> str:
    return "n/a" if x is None else format(x, spec)


def compare(args: argparse.Namespace) -> None:
    have_theirs = build("titans-pytorch") is not None
    impls = IMPLS if have_theirs else IMPLS[:2]
    impls += BASELINE_IMPLS if args.baseline else ()
    rows, baseline_rows = [], []
    for backward, label in ((False, "forward"), (True, "forward+backward")):
        best: dict[str, tuple[float, int]] = {}
        for _ in range(args.rounds):  # alternate the implementations' children
            for impl in impls:
                r = timed(impl, backward, T, args, 1)
                if r and (impl not in best or r[0] < best[impl][0]):
                    best[impl] = r
        mem = {impl: (child("memory", impl, backward, T, args) or {}).get("peak_mib") for impl in impls}
        tps = {impl: B * T / best[impl][0] if impl in best else None for impl in IMPLS + BASELINE_IMPLS}
        faults = {impl: best[impl][1] if impl in best else None for impl in IMPLS}
        ours, lag, theirs = tps["seqzoo"], tps["seqzoo-chunk-start"], tps["titans-pytorch"]
        m_ours, m_theirs = mem.get("seqzoo"), mem.get("titans-pytorch")
        rows.append([label, fmt(ours), fmt(theirs), fmt(ours / theirs if (ours and theirs) else None, ".2f") + "x",
                     fmt(lag), fmt(lag / theirs if (lag and theirs) else None, ".2f") + "x",
                     fmt(m_ours, ",.1f"), fmt(m_theirs, ",.1f"),
                     fmt(m_ours / m_theirs if (m_ours and m_theirs) else None, ".2f") + "x",
                     f"{fmt(faults['seqzoo'])} / {fmt(faults['titans-pytorch'])}"])
        for read, now, then in ((("token", "seqzoo", "baseline"), ("chunk_start", "seqzoo-chunk-start",
                                                                     "baseline-chunk-start")) if args.baseline else ()):
            a, b = tps[now], tps[then]
            baseline_rows.append([label, read, fmt(a), fmt(b), fmt(a / b if (a and b) else None, ".2f") + "x",
                                  fmt(a / theirs if (a and theirs) else None, ".2f") + "x",
                                  fmt(b / theirs if (b and theirs) else None, ".2f") + "x"])
    print("### seqzoo titans vs titans-pytorch NeuralMemory" + ("" if have_theirs else " (titans-pytorch not installed)"))
    print(table(["pass", "seqzoo tok/s", "titans-pytorch tok/s", "speed ratio", "seqzoo read=chunk_start tok/s",
                 "its speed ratio", "seqzoo peak MiB",
                 "titans-pytorch peak MiB", "memory ratio", "page faults per call (seqzoo / titans-pytorch)"], rows))
    if args.baseline:
        print(f"\n### this checkout (inner {args.inner}) vs the baseline {args.baseline} (inner "
              f"{args.baseline_inner}), same run")
        print(table(["pass", "read", "seqzoo tok/s", "baseline tok/s", "seqzoo / baseline",
                     "seqzoo vs titans-pytorch", "baseline vs titans-pytorch"], baseline_rows))


def loops(args: argparse.Namespace) -> None:
    """seqzoo's chunked op vs its per-token loops (same maths: gradients at chunk-start weights)."""
    from seqzoo.ops.titans import titans_memory
    from seqzoo.ops.titans_naive import titans_memory_naive

    g = torch.Generator().manual_seed(0)
    q, k = (F.normalize(torch.randn(B, T, 1, D, generator=g), dim=-1) for _ in range(2))
    v = torch.randn(B, T, 1, D, generator=g)
    theta, eta, alpha = 0.002 * torch.rand(B, T, 1), 0.9 * torch.ones(B, T, 1), 0.001 * torch.ones(B, T, 1)
    weights = [torch.randn(B, 1, D, D * EXPANSION) / D ** 0.5, torch.randn(B, 1, D * EXPANSION, D) / (D * EXPANSION) ** 0.5]
    short = 128  # the autograd token loop is slow; its tokens/s is measured on a prefix
    cases: list[tuple[str, Callable[[], object], int]] = [
        (f"chunked op, chunk {CHUNK}", lambda: titans_memory(q, k, v, theta, eta, alpha, weights, chunk_size=CHUNK), T),
        ("chunked op, chunk 1 (eq. 13-14 token recurrence)",
         lambda: titans_memory(q, k, v, theta, eta, alpha, weights, chunk_size=1), T),
        (f"naive token loop (torch.func), chunk {CHUNK}, T={short}",
         lambda: titans_memory_naive(*(z[:, :short] for z in (q, k, v, theta, eta, alpha)), weights,
                                     chunk_size=CHUNK), short),
    ]
    rows = []
    with torch.no_grad():
        for label, fn, t in cases:
            fn()
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - start)
            rows.append([label, fmt(B * t / best)])
    print("\n### seqzoo memory op, forward (no grad)")
    print(table(["path", "tok/s"], rows))


def sweep(args: argparse.Namespace) -> None:
    """seqzoo's tokens/s across T (linear cost: tokens/s should stay flat)."""
    rows, ref = [], {}
    t_len = 512
    while t_len <= args.max_t:
        row = [str(t_len)]
        for backward in (False, True):
            r = timed("seqzoo", backward, t_len, args, args.rounds)
            tps = B * t_len / r[0] if r else None
            ref.setdefault(backward, {})[t_len] = tps
            row += [fmt(tps), fmt(r[1] if r else None)]
        rows.append(row)
        t_len *= 2
    for row in rows:
        t_len = int(row[0])
        row += [fmt(ref[b][t_len] / ref[b][1024], ".2f") + "x" if ref[b].get(1024) and ref[b][t_len] else "n/a"
                for b in (False, True)]
    tuned = " (glibc told to keep freed memory)" if args.malloc_tuned else ""
    print(f"\n### seqzoo titans across T (B={B}){tuned}")
    print(table(["T", "forward tok/s", "forward page faults", "fwd+bwd tok/s", "fwd+bwd page faults",
                 "forward vs T=1K", "fwd+bwd vs T=1K"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per child (best kept)")
    parser.add_argument("--rounds", type=int, default=3, help="children per implementation and case (best kept)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--max-t", type=int, default=16384)
    parser.add_argument("--malloc-tuned", action="store_true", help="children keep freed memory (see the doc)")
    parser.add_argument("--sections", default="compare,loop,sweep", help="comma list of compare, loop, sweep")
    parser.add_argument("--inner", choices=sorted(INNER_MODELS), default="default",
                        help="seqzoo's memory: default (x + LN(MLP(x))) or plain (the paper's MLP)")
    parser.add_argument("--baseline", default=None, metavar="DIR",
                        help="also time seqzoo from this checkout (a speed regression check, same run)")
    parser.add_argument("--baseline-inner", choices=sorted(INNER_MODELS), default=None,
                        help="the baseline's memory (default: --inner; 'default' = that checkout's default)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.baseline_inner = args.baseline_inner or args.inner
    if args.baseline and not os.path.isdir(os.path.join(args.baseline, "seqzoo")):
        parser.error(f"--baseline {args.baseline}: expected a seqzoo checkout (a folder holding seqzoo/)")
    if args.child:
        task, impl, backward, t = args.child
        print(json.dumps(_child(task, impl, bool(int(backward)), int(t), args.repeats, args.threads, args.inner)))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    sections = set(args.sections.split(","))
    print(f"torch {torch.__version__}, {args.threads or torch.get_num_threads()} threads, B={B} T={T} d={D} heads=1 "
          f"chunk={CHUNK} memory depth={DEPTH} expansion={EXPANSION}; best of {args.repeats} calls x {args.rounds} "
          f"child processes{', malloc tuned' if args.malloc_tuned else ''}; seqzoo inner model: "
          f"{args.inner}\n")
    if "compare" in sections:
        compare(args)
    if "loop" in sections:
        loops(args)
    if "sweep" in sections:
        sweep(args)


if __name__ == "__main__":
    main()
