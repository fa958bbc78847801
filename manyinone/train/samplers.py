"""Which sub-networks get a loss term at a training step.

Every sampler is a pure function of (seed, step): a resumed run and every distributed rank draw
the same specs without sharing any state.

A sampler is registered by name (`@SAMPLERS.register`), and its `config_options` map each of its
keyword arguments to the TrainConfig field that sets it: `sampler_for(cfg, space)` builds it from a
config, and the config takes its allowed `sampler` values from the registry.
"""

from __future__ import annotations

import random
from typing import Any, ClassVar, Protocol

from manyinone.core.space import NestedSpace, SubnetSpec
from manyinone.core.errors import ManyinoneError
from manyinone.core.kinds import SAMPLERS


class Sampler(Protocol):
    def sample(self, step: int) -> list[SubnetSpec]:
        """Specs to train at optimizer step `step`, smallest first, without duplicates."""
        ...


def _rng(seed: int, step: int) -> random.Random:
    # One independent stream per (seed, step); no state carried between steps.
    return random.Random(seed * 1_000_003 + step)


@SAMPLERS.register("all")
class AllSpecs:
    """Every spec every step: the SoFT paper's recipe."""

    config_options: ClassVar[dict[str, str]] = {}  # keyword argument -> the TrainConfig field that sets it

    def __init__(self, space: NestedSpace, seed: int = 0) -> None:
        self.specs = space.specs()

    def sample(self, step: int) -> list[SubnetSpec]:
        return list(self.specs)


@SAMPLERS.register("random-k")
class RandomK:
    """Each step a uniform draw of random_k specs, plus the full one."""

    config_options: ClassVar[dict[str, str]] = {"k": "random_k"}
    # `include_full=False` (for direct use) leaves the full spec to the draw.

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


@SAMPLERS.register("sandwich")
class Sandwich:
    """Full + smallest + sandwich_random others each step: the sandwich rule of slimmable networks and Flextron."""

    config_options: ClassVar[dict[str, str]] = {"n_random": "sandwich_random"}

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


def make_sampler(name: str, space: NestedSpace, seed: int, **options: int) -> Sampler:
    """The registered sampler `name` over `space` (unknown names list the registered ones)."""
    return SAMPLERS.get(name)(space, seed=seed, **options)


def sampler_for(cfg: Any, space: NestedSpace) -> Sampler:
    """The sampler a TrainConfig names, each of its options read from the config field it declares."""
    cls = SAMPLERS.get(cfg.sampler)
    return cls(space, seed=cfg.seed, **{arg: getattr(cfg, field) for arg, field in cls.config_options.items()})
