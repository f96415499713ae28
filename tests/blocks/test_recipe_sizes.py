"""Recipe sizes: the paper's 340M configurations are built (on the meta device: shapes only,
no memory, no init cost) and counted; the tiny recipes are matched to within ±10% of each
other so that CPU comparisons between them are fair."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import seqzoo

ROOT = Path(__file__).resolve().parents[2]
PAPER = sorted((ROOT / "recipes" / "paper-340m").glob("*.yaml"))
TINY = sorted((ROOT / "recipes").glob("tiny-*.yaml"))
# The 15 models of the Titans paper's comparison (section 5, table 1).
PAPER_VARIANTS = {"lmm", "mac", "mag", "mal", "transformer", "retnet", "gla", "mamba", "mamba2", "deltanet",
                  "gated-deltanet", "ttt", "samba", "gated-deltanet-h1", "gated-deltanet-h2"}


def _count_on_meta(path: Path) -> int:
    with torch.device("meta"):
        model = seqzoo.build_model(path)
    assert all(p.is_meta for p in model.parameters())
    return model.num_params()


def test_every_paper_variant_has_a_recipe():
    assert {p.stem for p in PAPER} == PAPER_VARIANTS


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_recipe_builds_at_340m(path):
    recipe = seqzoo.load_recipe(path)
    assert recipe.model.vocab_size == 32000 and recipe.task["seq_len"] == 4096
    n = _count_on_meta(path)
    assert abs(n - 340e6) <= 0.05 * 340e6, f"{path.name}: {n:,} parameters, expected 340M ± 5%"


def test_tiny_recipes_are_matched_within_ten_percent():
    counts = {p.stem: _count_on_meta(p) for p in TINY}
    assert len(counts) >= 2
    lo, hi = min(counts.values()), max(counts.values())
    table = ", ".join(f"{k}={v:,}" for k, v in sorted(counts.items(), key=lambda kv: kv[1]))
    assert hi <= 1.10 * lo, f"tiny recipes differ by more than 10%: {table}"
