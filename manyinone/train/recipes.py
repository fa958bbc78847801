"""Named training recipes (`manyinone train --recipe NAME`): the measured settings behind benchmarks/RESULTS.md.

A recipe is a set of TrainConfig values applied first; a config file, `--set` and flags given by
the user win over it. Figures: SmolLM2-135M + Alpaca on one H200 (benchmarks/quality.py), where
"gentle" is `manyinone-gentle` and "agree" is `agree-big-lr3`. The learning rates were tuned at
135M only; docs/training.md says how to start at 7B or 13B.
"""

from __future__ import annotations

from typing import Any

from manyinone.core.errors import ManyinoneError


def _full_weighted(exits: int) -> list[float]:
    """Every exit at weight 1, the full depth (the last exit) at 3."""
    return [1.0] * (exits - 1) + [3.0]


# name -> (what it is for, settings; "exit_weights" is filled in for the run's number of exits)
RECIPES: dict[str, tuple[str, dict[str, Any]]] = {
    "gentle": ("labels only: self-distillation, per-exit translators, full depth weighted 3x",
               {"epochs": 4, "lr": 1e-4, "distill_weight": 1.0, "exit_heads": "translator",
                "exit_heads_lr_scale": 30.0}),
    "agree": ("exits that agree with the full depth: a frozen teacher (teacher=) and its sampled "
              "responses (mix_data=, from `manyinone distill-data`) at 75% of each epoch",
              {"epochs": 2, "lr": 3e-4, "warmup_steps": 20, "distill_weight": 1.0, "exit_heads": "translator",
               "exit_heads_lr_scale": 10.0, "mix_ratio": 0.75}),
}
NEEDS = {"agree": ("teacher", "mix_data")}  # fields the user must supply: they name the user's own runs


def recipe_settings(name: str, exits: int) -> dict[str, Any]:
    """TrainConfig values of recipe `name` for a run with `exits` exits (the full depth included)."""
    if name not in RECIPES:
        raise ManyinoneError(f"recipe {name!r} unknown; known: {', '.join(RECIPES)}")
    return {**RECIPES[name][1], "exit_weights": _full_weighted(exits)}


def check_supplied(name: str, values: dict[str, Any]) -> None:
    """The recipe's own inputs (a teacher, generated data) are the user's: say how to make missing ones."""
    missing = [field for field in NEEDS.get(name, ()) if not values.get(field)]
    if missing:
        raise ManyinoneError(
            f"recipe {name!r} needs {', '.join(f'{m}=...' for m in missing)}: teacher=<an SFT run, e.g. "
            "`manyinone train --exits <layers>`> and mix_data=<`manyinone distill-data --teacher <that run>` output>")
