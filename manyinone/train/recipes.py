"""Named training recipes (`manyinone train --recipe NAME`): the measured settings behind benchmarks/RESULTS.md.

A recipe is a set of TrainConfig values applied first; a config file, `--set` and flags given by
the user win over it. Figures: SmolLM2-135M + Alpaca on one H200 (benchmarks/quality.py), where
"gentle" is `manyinone-gentle` and "agree" is `agree-xl-layer` (round 8: with 16 samples per prompt from
`manyinone distill-data --samples 16`, started from the teacher itself, a decoder layer of its own per exit).
The learning rates were tuned at 135M only; docs/training.md says how to start at 7B or 13B.
"""

from __future__ import annotations

from typing import Any

from manyinone.core.errors import ManyinoneError


def _exit_weights(exits: int, full: float) -> list[float]:
    """Every exit at weight 1, the full depth (the last exit) at `full`."""
    return [1.0] * (exits - 1) + [full]


# name -> (what it is for, settings, the full depth's label weight; "exit_weights" is filled in for
# the run's number of exits)
RECIPES: dict[str, tuple[str, dict[str, Any], float]] = {
    "gentle": ("labels only: self-distillation, per-exit translators, full depth weighted 3x",
               {"epochs": 4, "lr": 1e-4, "distill_weight": 1.0, "exit_heads": "translator",
                "exit_heads_lr_scale": 30.0}, 3.0),
    # The full depth is held by the teacher (KL x3) rather than by labels x3: closer to SFT's loss.
    "agree": ("exits that agree with the full depth: a frozen teacher (teacher=) and its sampled "
              "responses (mix_data=, from `manyinone distill-data --samples 16`) at 90% of one epoch, "
              "a decoder layer of its own per exit",
              {"epochs": 1, "lr": 3e-4, "warmup_steps": 20, "distill_weight": 1.0, "exit_heads": "layer",
               "exit_heads_lr_scale": 10.0, "mix_ratio": 0.9, "teacher_full_weight": 3.0}, 1.0),
}
NEEDS = {"agree": ("teacher", "mix_data")}  # fields the user must supply: they name the user's own runs


def recipe_settings(name: str, exits: int) -> dict[str, Any]:
    """TrainConfig values of recipe `name` for a run with `exits` exits (the full depth included)."""
    if name not in RECIPES:
        raise ManyinoneError(f"recipe {name!r} unknown; known: {', '.join(RECIPES)}")
    _, settings, full = RECIPES[name]
    return {**settings, "exit_weights": _exit_weights(exits, full)}


def check_supplied(name: str, values: dict[str, Any]) -> None:
    """The recipe's own inputs (a teacher, generated data) are the user's: say how to make missing ones."""
    missing = [field for field in NEEDS.get(name, ()) if not values.get(field)]
    if missing:
        raise ManyinoneError(
            f"recipe {name!r} needs {', '.join(f'{m}=...' for m in missing)}: teacher=<an SFT run, e.g. "
            "`manyinone train --exits <layers>`> and mix_data=<`manyinone distill-data --teacher <that run>` output>")
