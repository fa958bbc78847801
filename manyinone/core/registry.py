"""The registries: adapters by HF `model_type`, and the named kinds a training config picks from
(samplers, exit-head kinds, cost metrics).

Each named kind is registered once, where it is defined (`@SAMPLERS.register("sandwich")` on its
class); the config's allowed values, the CLI's help and the loop's lookup all read the registry, so
adding one is that one registration.

Built-in adapters use the same `manyinone.adapters` entry-point group as third-party ones, so
`pip install my-adapter` is all a user needs to teach manyinone a new architecture.

Several adapters may serve one model type if they offer different axes (llama-depth: depth;
llama-flextron: depth, width, heads). A request names the axes it needs and gets the adapter with
the fewest axes that has them all, so depth-only work keeps the plain depth adapter.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Sequence
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Generic, TypeVar

from manyinone.core.errors import ManyinoneError

if TYPE_CHECKING:  # core.cost registers its metrics here and core.adapter imports core.cost: no import cycle
    from torch import nn

    from manyinone.core.adapter import ModelAdapter

T = TypeVar("T")


class Registry(Generic[T]):
    """Named implementations of one kind, in registration order.

    `home` is the module that registers the built-in ones; it is imported on first lookup, so a reader
    (a config, the CLI's help) sees them without importing it first, as adapters are discovered."""

    def __init__(self, kind: str, home: str) -> None:
        self.kind, self.home = kind, home
        self._entries: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        """Register the decorated class or function under `name` (a name registered twice is an error)."""
        def add(entry: T) -> T:
            if name in self._entries and self._entries[name] is not entry:
                raise ManyinoneError(f"{self.kind} {name!r} is already registered ({self._entries[name]!r})")
            self._entries[name] = entry
            return entry
        return add

    def _load(self) -> dict[str, T]:
        if not self._loaded:
            self._loaded = True
            importlib.import_module(self.home)
        return self._entries

    def names(self) -> tuple[str, ...]:
        return tuple(self._load())

    def get(self, name: str) -> T:
        entries = self._load()
        if name not in entries:
            raise ManyinoneError(f"unknown {self.kind} {name!r}; allowed {sorted(entries)}")
        return entries[name]

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(list(self._load().items()))

    def summaries(self) -> str:
        """`name (first docstring line); ...`: the choices as `train --help` lists them."""
        def summary(entry: T) -> str:
            line = ((getattr(entry, "__doc__", None) or "").strip().splitlines() or [""])[0].rstrip(".")
            return line[:1].lower() + line[1:] if line[1:2].islower() else line  # mid-sentence; acronyms kept

        return "; ".join(f"{name} ({summary(e)})" if summary(e) else name for name, e in self.items())


# Which sub-networks get a loss each step (`train.samplers`), what sits between an exit and the
# vocabulary (`train.exit_heads`), and what a budget counts (`core.cost`).
SAMPLERS: Registry = Registry("sampler", "manyinone.train.samplers")
EXIT_HEAD_KINDS: Registry = Registry("exit_heads kind", "manyinone.train.exit_heads")
COST_METRICS: Registry = Registry("cost metric", "manyinone.core.cost")

ENTRY_POINT_GROUP = "manyinone.adapters"
# model_type -> its adapters, fewest axes first (tuples: a copy of the dict is a full snapshot).
_ADAPTERS: dict[str, tuple[type[ModelAdapter], ...]] = {}
_discovered = False


def register_adapter(adapter: type[ModelAdapter]) -> type[ModelAdapter]:
    """Register `adapter` for each of its `model_types`; usable as a class decorator."""
    from manyinone.core.adapter import ModelAdapter

    if not (isinstance(adapter, type) and issubclass(adapter, ModelAdapter)):
        raise ManyinoneError(f"{adapter!r} is not a ModelAdapter subclass")
    for model_type in adapter.model_types:
        served = _ADAPTERS.get(model_type, ())
        if adapter in served:
            continue
        for other in served:
            if set(other.axes) == set(adapter.axes):
                raise ManyinoneError(
                    f"model_type {model_type!r} already served by {other.name!r} with axes {list(other.axes)}; "
                    f"cannot also register {adapter.name!r} for the same axes"
                )
        _ADAPTERS[model_type] = tuple(sorted((*served, adapter), key=lambda a: (len(a.axes), a.name)))
    return adapter


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        register_adapter(ep.load())


def registered_model_types() -> list[str]:
    _discover()
    return sorted(_ADAPTERS)


def adapter_class(model_type: str, axes: Sequence[str] | None = None) -> type[ModelAdapter]:
    """The adapter for `model_type` with the fewest axes that include all of `axes` (None: any)."""
    _discover()
    if model_type not in _ADAPTERS:
        raise ManyinoneError(
            f"unknown model type {model_type!r}; registered: {registered_model_types()} "
            f"(add one with manyinone.core.registry.register_adapter)"
        )
    served = _ADAPTERS[model_type]
    for adapter in served:
        if axes is None or set(axes) <= set(adapter.axes):
            return adapter
    offered = ", ".join(f"{a.name!r} {list(a.axes)}" for a in served)
    raise ManyinoneError(f"axes {list(axes or [])} not supported for model type {model_type!r}; adapters: {offered}")


def adapter_for(model: nn.Module, axes: Sequence[str] | None = None) -> ModelAdapter:
    """The registered adapter wrapping `model`, chosen by `model.config.model_type` and the `axes` needed."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return adapter_class(str(model_type), axes)(model)
