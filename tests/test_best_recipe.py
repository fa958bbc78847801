"""benchmarks/best_recipe.py: the recipe gpu_next.sh drafts from is the one whose exits agree best."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from best_recipe import best_recipe  # noqa: E402


def exits(*agreement: float) -> dict:
    return {"exits": [{"gen_agreement": a} for a in agreement]}


def test_the_best_is_the_highest_mean_over_the_exits_without_the_full_depth():
    results = {
        "sft": exits(0.9, 0.9, 1.0),  # never a candidate, however it scores
        "a": exits(0.5, 0.7, 0.99),  # mean 0.60
        "b": exits(0.6, 0.62, 0.10),  # mean 0.61: the full depth's own figure must not count
        "c": {"exits": [{"loss": 1.0}, {"loss": 2.0}]},  # evaluated without --gen-prompts
        "_data": {"gen16": {"records": 3}},
    }
    assert best_recipe(results) == "b"
    assert best_recipe({"sft": exits(0.5, 1.0), "c": results["c"]}) is None
