"""Long streams through every Titans-family mixer and TTT (not CI): 64K tokens in 1K calls,
default settings at d_model 32, fp32, inputs x1 and x10; prints max|y| per mixer at tokens
0, 1K, 4K, 16K and 64K, the lowest ratio to the first token, and where (if ever) the output
first became non-finite. CI runs the 16K version (tests/mixers/test_titans_stability.py).

    python benchmarks/titans_long_stream.py [--tokens 65536] [--scales 1 10] [--d-model 32]
"""

from __future__ import annotations

import argparse
import time

import torch

from seqzoo.diagnostics.long_stream import stream

FAMILY = ["titans", "titans_mac", "titans_mag", "titans_mal", "ttt_linear", "ttt_mlp"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--call", type=int, default=1024, help="tokens per call")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 10.0])
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--mixers", nargs="+", default=FAMILY)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    calls = a.tokens // a.call
    marks = [m for m in (0, 1024, 4096, 16384, 65536) if m <= a.tokens]
    head = ["mixer", "inputs", *[f"max abs y @ {m // 1024}K" if m else "max abs y @ token 0" for m in marks],
            "lowest / first", "finite", "s"]
    print(f"{a.tokens:,} tokens in calls of {a.call}, d_model {a.d_model}, fp32, default settings\n")
    print("| " + " | ".join(head) + " |\n|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|")
    for name in a.mixers:
        for scale in a.scales:
            t0 = time.perf_counter()
            r = stream(name, scale=scale, calls=calls, length=a.call, d_model=a.d_model)
            vals = [r.first_token] + [r.peaks[m // a.call - 1] if m // a.call - 1 < len(r.peaks) else float("nan")
                                      for m in marks[1:]]
            finite = "yes" if r.finite else f"no (call {r.first_bad_call})"
            print(f"| {name} | x{scale:g} | " + " | ".join(f"{v:.3g}" for v in vals)
                  + f" | {r.lowest_ratio:.3g} | {finite} | {time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
