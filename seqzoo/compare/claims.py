"""Claims: published qualitative results a sweep checks against its own measurements.

A sweep's ``claims:`` list holds entries of three kinds; each names its ``source`` (the paper,
figure or table) and picks models by label, or by a shell-style pattern (``attention*``):

    - kind: threshold        # every model picked reaches a bound (seed mean)
      claim: attention solves MQAR at every width
      source: Arora et al. 2023 (Zoology), fig. 2
      models: ["attention-*"]
      at_least: 0.99         # or at_most
      seq_lens: [64]         # default: the training length
    - kind: order            # each `better` model >= each `worse` model (+ margin)
      better: [titans-lmm]
      worse: [ttt-linear, gated-deltanet]
    - kind: degrades_faster  # the metric drops more from `from_len` to `to_len`
      faster: [mamba2]
      slower: [titans-lmm, titans-mac]
      from_len: 256
      to_len: 2048
      min_at_start: 0.5      # every model must first work at from_len

``metric`` defaults to the task's headline metric; "better" and "drop" follow its direction
(lower is better for loss and bits per byte). A claim holds only if every model it names has
a finished run; the report shows what was measured (mean ± std over seeds) beside the verdict.
"""

from __future__ import annotations

import fnmatch
import math
import statistics
from dataclasses import dataclass
from typing import Annotated, Callable, Literal, Union

from pydantic import BaseModel, Field, model_validator

from seqzoo.limits import MAX_SEQ_LEN
from seqzoo.strict_schema import STRICT

Pattern = Annotated[str, Field(min_length=1, max_length=200)]
Patterns = Annotated[list[Pattern], Field(min_length=1, max_length=256)]
SeqLen = Annotated[int, Field(ge=1, le=MAX_SEQ_LEN)]


class _ClaimBase(BaseModel):
    model_config = STRICT

    claim: str = Field(min_length=1, max_length=500, description="the published result, in words")
    source: str = Field(min_length=1, max_length=500, description="paper and figure/table it comes from")
    metric: str | None = Field(None, description="default: the task's headline metric")

    def patterns(self) -> dict[str, list[str]]:
        """The model-pattern fields of this claim (name -> patterns)."""
        raise NotImplementedError

    def lengths(self) -> dict[str, list[int | None]]:
        """The test-length fields of this claim (None = the training length)."""
        raise NotImplementedError


class ThresholdClaim(_ClaimBase):
    kind: Literal["threshold"]
    models: Patterns
    at_least: float | None = None
    at_most: float | None = None
    seq_lens: list[SeqLen] | None = Field(None, min_length=1, max_length=64,
                                          description="test lengths it must hold at; default: the training length")

    @model_validator(mode="after")
    def _one_bound(self) -> "ThresholdClaim":
        if (self.at_least is None) == (self.at_most is None):
            raise ValueError("give exactly one of at_least and at_most")
        return self

    def patterns(self) -> dict[str, list[str]]:
        return {"models": self.models}

    def lengths(self) -> dict[str, list[int | None]]:
        return {"seq_lens": list(self.seq_lens or [None])}


class OrderClaim(_ClaimBase):
    kind: Literal["order"]
    better: Patterns
    worse: Patterns
    margin: float = Field(0.0, ge=0, description="how much better, in the metric's units")
    seq_len: SeqLen | None = Field(None, description="default: the training length")

    def patterns(self) -> dict[str, list[str]]:
        return {"better": self.better, "worse": self.worse}

    def lengths(self) -> dict[str, list[int | None]]:
        return {"seq_len": [self.seq_len]}


class DegradesFasterClaim(_ClaimBase):
    kind: Literal["degrades_faster"]
    faster: Patterns
    slower: Patterns
    from_len: SeqLen | None = Field(None, description="default: the training length")
    to_len: SeqLen
    min_at_start: float | None = Field(None, description=(
        "every model named must reach this at from_len (seed mean): a model at chance has nothing to lose, "
        "so without it 'degrades slower' could hold vacuously"))

    def patterns(self) -> dict[str, list[str]]:
        return {"faster": self.faster, "slower": self.slower}

    def lengths(self) -> dict[str, list[int | None]]:
        return {"from_len": [self.from_len], "to_len": [self.to_len]}


Claim = Annotated[Union[ThresholdClaim, OrderClaim, DegradesFasterClaim], Field(discriminator="kind")]


def match(patterns: list[str], labels: list[str]) -> list[str]:
    """The labels any pattern picks, in sweep order."""
    return [label for label in labels if any(fnmatch.fnmatchcase(label, p) for p in patterns)]


def claim_problems(claim: _ClaimBase, labels: list[str], metrics: tuple[str, ...],
                   lengths: list[int], train_len: int) -> list[tuple[str, str]]:
    """(field, what is wrong) for each reference the sweep cannot measure."""
    problems = []
    for field, pats in claim.patterns().items():
        for i, p in enumerate(pats):
            if not match([p], labels):
                problems.append((f"{field}[{i}]", f"no model is labelled like {p!r}; models: {', '.join(labels)}"))
    if claim.metric is not None and claim.metric not in metrics:
        problems.append(("metric", f"the task reports {', '.join(metrics)}, not {claim.metric!r}"))
    for field, values in claim.lengths().items():
        for n in values:
            if n is not None and n != train_len and n not in lengths:
                problems.append((field, f"{n} is not a tested length; eval_seq_lens: {lengths}"))
    return problems


@dataclass
class ClaimResult:
    claim: _ClaimBase
    holds: bool
    measured: str  # what the verdict rests on, e.g. "attention 0.995 ± 0.003 (3 seeds)"


Values = Callable[[str, int, str], list[float]]  # (label, test length, metric) -> one value per finished seed


def mean_std(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def fmt_mean_std(xs: list[float], digits: int = 3) -> str:
    if not xs:
        return "no finished run"
    m, s = mean_std(xs)
    return f"{m:.{digits}f}" if len(xs) == 1 else f"{m:.{digits}f} ± {s:.{digits}f} ({len(xs)} seeds)"


def check(claim: _ClaimBase, labels: list[str], values: Values, *, headline: str, train_len: int,
          higher_is_better: Callable[[str], bool]) -> ClaimResult:
    """Evaluate one claim on seed means; a model without a finished run makes it fail."""
    metric = claim.metric or headline
    sign = 1.0 if higher_is_better(metric) else -1.0

    def mean(label: str, n: int | None) -> float:
        return mean_std(values(label, train_len if n is None else n, metric))[0]

    def show(label: str, n: int | None, what: str = "") -> str:
        return f"{label}{what} {fmt_mean_std(values(label, train_len if n is None else n, metric))}"

    if isinstance(claim, ThresholdClaim):
        picked = match(claim.models, labels)
        bound = claim.at_least if claim.at_least is not None else claim.at_most
        ok = all(math.isfinite(v := mean(m, n)) and (v >= bound if claim.at_least is not None else v <= bound)
                 for m in picked for n in claim.lengths()["seq_lens"])
        multi = len(claim.lengths()["seq_lens"]) > 1
        parts = [show(m, n, f" @{train_len if n is None else n}" if multi else "")
                 for m in picked for n in claim.lengths()["seq_lens"]]
        rel = "≥" if claim.at_least is not None else "≤"
        return ClaimResult(claim, ok, f"{metric} {rel} {bound:g}: " + "; ".join(parts))
    if isinstance(claim, OrderClaim):
        better, worse = match(claim.better, labels), match(claim.worse, labels)
        n = claim.seq_len
        ok = all(math.isfinite(b := mean(x, n)) and math.isfinite(w := mean(y, n))
                 and sign * (b - w) >= claim.margin for x in better for y in worse)
        at = f" at T={train_len if n is None else n}"
        return ClaimResult(claim, ok, f"{metric}{at}: " + "; ".join(show(m, n) for m in better) + "  vs  "
                           + "; ".join(show(m, n) for m in worse))
    assert isinstance(claim, DegradesFasterClaim)
    faster, slower = match(claim.faster, labels), match(claim.slower, labels)
    start = train_len if claim.from_len is None else claim.from_len

    def drops(label: str) -> list[float]:
        a, b = values(label, start, metric), values(label, claim.to_len, metric)
        return [sign * (x - y) for x, y in zip(a, b)]  # per seed: how much worse at to_len

    ok = all(math.isfinite(f := mean_std(drops(x))[0]) and math.isfinite(s := mean_std(drops(y))[0]) and f > s
             for x in faster for y in slower)
    parts = [f"{m} drop {fmt_mean_std(drops(m))}" for m in faster + slower]
    if claim.min_at_start is not None:
        weak = [m for m in faster + slower
                if not sign * (mean_std(values(m, start, metric))[0] - claim.min_at_start) >= 0]
        ok = ok and not weak
        parts.append(f"at T={start} every model must reach {claim.min_at_start:g}"
                     + (f"; not reached by {', '.join(f'{m} ({fmt_mean_std(values(m, start, metric))})' for m in weak)}"
                        if weak else ""))
    return ClaimResult(claim, ok, f"{metric} T={start} → {claim.to_len}: " + "; ".join(parts))
