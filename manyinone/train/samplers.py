"""Which sub-networks get a loss term at a training step.

Every sampler is a pure function of (seed, step): a resumed run and every distributed rank draw
the same specs without sharing any state.
"""

from __future__ import annotations

import random
from typing import Protocol

from manyinone.core.space import NestedSpace, SubnetSpec
from manyinone.core.errors import ManyinoneError


class Sampler(Protocol):
    def sample(self, step: int) -> list[SubnetSpec]:
        """Specs to train at optimizer step `step`, smallest first, without duplicates."""
        ...


def _rng(seed: int, step: int) -> random.Random:
    # One independent stream per (seed, step); no state carried between steps.
    return random.Random(seed * 1_000_003 + step)


class AllSpecs:
    """Every spec every step: the SoFT paper's recipe."""

    def __init__(self, space: NestedSpace, seed: int = 0) -> None:
        self.specs = space.specs()

    def sample(self, step: int) -> list[SubnetSpec]:
        return list(self.specs)


class RandomK:
    """`k` specs drawn uniformly each step; the full spec is always added when `include_full`."""

    def __init__(self, space: NestedSpace, seed: int = 0, k: int = 2, include_full: bool = True) -> None:
        self.specs, self.full, self.seed, self.include_full = space.specs(), space.full(), seed, include_full
        pool = len(self.specs) - (1 if include_full else 0)
        if not 1 <= k <= max(pool, 1):
            raise ManyinoneError(f"random-k: k={k} out of range; allowed 1..{max(pool, 1)} for this space")
        self.k = k

    def sample(self, step: int) -> list[SubnetSpec]:
        pool = [s for s in self.specs if not (self.include_full and s == self.full)]
        chosen = set(_rng(self.seed, step).sample(pool, min(self.k, len(pool))))
        if self.include_full:
            chosen.add(self.full)
        return [s for s in self.specs if s in chosen]


class Sandwich:
    """Full + smallest + `n_random` others (the sandwich rule of slimmable networks / Flextron)."""

    def __init__(self, space: NestedSpace, seed: int = 0, n_random: int = 1) -> None:
        self.specs, self.seed, self.n_random = space.specs(), seed, n_random
        self.full, self.smallest = space.full(), space.smallest()
        if n_random < 0:
            raise ManyinoneError(f"sandwich: n_random={n_random} must be >= 0")

    def sample(self, step: int) -> list[SubnetSpec]:
        middle = [s for s in self.specs if s not in (self.full, self.smallest)]
        chosen = {self.full, self.smallest}
        chosen.update(_rng(self.seed, step).sample(middle, min(self.n_random, len(middle))))
        return [s for s in self.specs if s in chosen]


SAMPLERS = {"all": AllSpecs, "random-k": RandomK, "sandwich": Sandwich}


def make_sampler(name: str, space: NestedSpace, seed: int, **options: int) -> Sampler:
    if name not in SAMPLERS:
        raise ManyinoneError(f"unknown sampler {name!r}; allowed {sorted(SAMPLERS)}")
    return SAMPLERS[name](space, seed=seed, **options)
