"""Nested dimensions, the space of sub-networks they span, and sub-network specs.

Pure data: nothing here knows about torch modules or model architectures. An adapter maps a
`SubnetSpec` onto its model; the samplers, the loss engine and budget resolution only see specs.

Example:
    >>> space = NestedSpace([DepthDim(total=30, choices=(6, 12, 18, 24, 30))])
    >>> space.full()
    SubnetSpec(depth=30)
    >>> [s.label for s in space.specs()][:2]
    ['depth=6', 'depth=12']
"""

from __future__ import annotations

import itertools
from abc import ABC
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from manyinone.core.errors import ManyinoneError


@dataclass(frozen=True)
class NestedDimension(ABC):
    """One elastic axis: `choices` are the trained sizes (ascending), `total` the full size.

    Every choice is a prefix of the axis (the first n layers, neurons or heads), so a smaller
    choice is always contained in a larger one. Subclasses only fix the axis name and the unit.
    """

    total: int
    choices: tuple[int, ...] = ()
    name: str = field(default="", init=False)
    unit: str = field(default="", init=False)

    def __post_init__(self) -> None:
        if self.total < 1:
            raise ManyinoneError(f"{self.name}: total must be >= 1, got {self.total}")
        choices = tuple(self.choices) or (self.total,)
        bad = [c for c in choices if not (isinstance(c, int) and 1 <= c <= self.total)]
        if bad:
            raise ManyinoneError(
                f"{self.name} choices {list(choices)}: {bad} out of range; allowed 1..{self.total} {self.unit}"
            )
        if list(choices) != sorted(set(choices)):
            raise ManyinoneError(
                f"{self.name} choices {list(choices)} must be strictly increasing, e.g. {sorted(set(choices))}"
            )
        if choices[-1] != self.total:
            # The full model is always a member: budget None means "everything".
            choices = choices + (self.total,)
        object.__setattr__(self, "choices", choices)

    @property
    def full(self) -> int:
        return self.total

    @property
    def smallest(self) -> int:
        return self.choices[0]


@dataclass(frozen=True)
class DepthDim(NestedDimension):
    """Number of decoder layers kept from the bottom (SoFT exits)."""

    name: str = field(default="depth", init=False)
    unit: str = field(default="layers", init=False)


@dataclass(frozen=True)
class WidthDim(NestedDimension):
    """MLP intermediate neurons kept per layer (the most important first, after reordering)."""

    name: str = field(default="width", init=False)
    unit: str = field(default="neurons", init=False)


@dataclass(frozen=True)
class HeadsDim(NestedDimension):
    """Attention query heads kept per layer. With grouped-query attention an adapter keeps whole
    query groups (and their KV head), so it only accepts multiples of the group size."""

    name: str = field(default="heads", init=False)
    unit: str = field(default="heads", init=False)


DIMENSIONS: dict[str, type[NestedDimension]] = {"depth": DepthDim, "width": WidthDim, "heads": HeadsDim}


def register_dimension(cls: type[NestedDimension]) -> type[NestedDimension]:
    """Make a new axis's dimension known by name (so checkpoints that nest it can be read back).
    Usable as a class decorator; a name already taken by another class is refused."""
    name = cls(total=1).name
    if not name or (name in DIMENSIONS and DIMENSIONS[name] is not cls):
        raise ManyinoneError(f"dimension name {name!r} empty or taken; registered {sorted(DIMENSIONS)}")
    DIMENSIONS[name] = cls
    return cls


def even_exits(total: int, count: int = 5) -> tuple[int, ...]:
    """`count` exits spread evenly up to `total`, e.g. (30, 5) -> (6, 12, 18, 24, 30)."""
    return tuple(sorted({max(1, round(total * k / count)) for k in range(1, count + 1)}))


def even_sizes(total: int, count: int, multiple: int = 1) -> tuple[int, ...]:
    """`count` sizes spread evenly up to `total`, each a multiple of `multiple` (a GQA group, a
    64-neuron tile), e.g. (1536, 4, 64) -> (384, 768, 1152, 1536); (9, 3, 3) -> (3, 6, 9)."""
    steps = total // multiple
    return tuple(sorted({max(1, round(steps * k / count)) * multiple for k in range(1, count + 1)} | {total}))


class SubnetSpec(Mapping[str, int]):
    """An immutable, hashable choice of size per axis, e.g. `SubnetSpec(depth=12)`."""

    __slots__ = ("_items",)

    def __init__(self, values: Mapping[str, int] | None = None, **kwargs: int) -> None:
        merged = {**(values or {}), **kwargs}
        self._items = tuple(sorted((str(k), int(v)) for k, v in merged.items()))

    def __getitem__(self, key: str) -> int:
        for k, v in self._items:
            if k == key:
                return v
        raise KeyError(key)

    def __iter__(self):
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SubnetSpec) and self._items == other._items

    def __repr__(self) -> str:
        return f"SubnetSpec({', '.join(f'{k}={v}' for k, v in self._items)})"

    @property
    def label(self) -> str:
        """Short human name used in tables and metrics, e.g. 'depth=12'."""
        return ",".join(f"{k}={v}" for k, v in self._items)

    def to_dict(self) -> dict[str, int]:
        return dict(self._items)


class NestedSpace:
    """The product of several nested dimensions: every combination of their choices is a spec."""

    def __init__(self, dims: Iterable[NestedDimension]) -> None:
        self.dims: dict[str, NestedDimension] = {}
        for dim in dims:
            if dim.name in self.dims:
                raise ManyinoneError(f"axis {dim.name!r} given twice")
            self.dims[dim.name] = dim
        if not self.dims:
            raise ManyinoneError("a nested space needs at least one axis")

    @property
    def axes(self) -> tuple[str, ...]:
        return tuple(self.dims)

    def specs(self) -> list[SubnetSpec]:
        """All specs, smallest first along the first axis."""
        names = list(self.dims)
        combos = itertools.product(*(self.dims[n].choices for n in names))
        return [SubnetSpec(dict(zip(names, values))) for values in combos]

    def full(self) -> SubnetSpec:
        return SubnetSpec({n: d.full for n, d in self.dims.items()})

    def smallest(self) -> SubnetSpec:
        return SubnetSpec({n: d.smallest for n, d in self.dims.items()})

    def validate(self, spec: Mapping[str, int]) -> SubnetSpec:
        """Return `spec` as a SubnetSpec, or raise naming the bad axis or value and what is allowed."""
        unknown = set(spec) - set(self.dims)
        if unknown:
            raise ManyinoneError(f"unknown axis {sorted(unknown)}; this space has {list(self.dims)}")
        values = {n: spec.get(n, d.full) for n, d in self.dims.items()}
        for name, value in values.items():
            if value not in self.dims[name].choices:
                raise ManyinoneError(
                    f"{name}={value} is not a trained choice; allowed {list(self.dims[name].choices)}"
                )
        return SubnetSpec(values)

    def to_dict(self) -> dict[str, dict[str, object]]:
        return {n: {"total": d.total, "choices": list(d.choices)} for n, d in self.dims.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Mapping[str, object]]) -> "NestedSpace":
        dims = []
        for name, fields in data.items():
            if name not in DIMENSIONS:
                raise ManyinoneError(f"unknown axis {name!r} in checkpoint; known axes {sorted(DIMENSIONS)}")
            dims.append(DIMENSIONS[name](total=int(fields["total"]), choices=tuple(fields["choices"])))
        return cls(dims)
