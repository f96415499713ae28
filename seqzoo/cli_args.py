"""Command-line parsing with seqzoo's error contract: a bad option is one line, exit 2.

argparse prints its usage block before the error; ``OneLineParser`` prints only
``error: seqzoo eval: argument --batches: expected an integer in [1, 1000000], got '0'``.
``int_in`` / ``float_in`` bound every numeric option the way the recipe schema bounds its
fields (no NaN, no infinity, no zero batches).
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Callable, NoReturn


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {' '.join(message.split())} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def int_in(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"expected an integer in [{lo:,}, {hi:,}], got {text!r}")
        return value

    parse.__name__ = "integer"
    return parse


def float_in(lo: float, hi: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and lo <= value <= hi):
            raise argparse.ArgumentTypeError(f"expected a finite number in [{lo:g}, {hi:g}], got {text!r}")
        return value

    parse.__name__ = "number"
    return parse
