"""Named kinds a training config picks from: samplers, exit-head kinds, cost metrics.

Each is registered once, where it is defined (`@SAMPLERS.register("sandwich")` on its class); the
config's allowed values, `train --help` and the loop's lookup all read these registries, so adding
one is that one registration. `core.registry` re-exports them beside the adapter registry.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from manyinone.core.errors import ManyinoneError

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
            importlib.import_module(self.home)  # its registrations run (a no-op while it is being imported)
            self._loaded = True
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
