"""The registries: adapters by HF `model_type`, and the named kinds a training config picks from
(samplers, exit-head kinds, cost metrics).

Each named kind (`core.kinds`, re-exported here) is registered once, where it is defined
(`@SAMPLERS.register("sandwich")` on its class); the config's allowed values, the CLI's help and
the loop's lookup all read the registry, so adding one is that one registration.

Built-in adapters use the same `manyinone.adapters` entry-point group as third-party ones, so
`pip install my-adapter` is all a user needs to teach manyinone a new architecture.

Several adapters may serve one model type if they offer different axes (llama-depth: depth;
llama-flextron: depth, width, heads). A request names the axes it needs and gets the adapter with
the fewest axes that has them all, so depth-only work keeps the plain depth adapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import entry_points

from torch import nn

from manyinone.core.adapter import ModelAdapter
from manyinone.core.errors import ManyinoneError
# The named kinds live in core.kinds (it imports nothing of the model side, so core.cost can register
# its metrics there); they are looked up here like everything else that is registered.
from manyinone.core.kinds import COST_METRICS, EXIT_HEAD_KINDS, SAMPLERS, Registry

__all__ = ["COST_METRICS", "ENTRY_POINT_GROUP", "EXIT_HEAD_KINDS", "SAMPLERS", "Registry", "adapter_class",
           "adapter_for", "register_adapter", "registered_model_types"]


ENTRY_POINT_GROUP = "manyinone.adapters"
# model_type -> its adapters, fewest axes first (tuples: a copy of the dict is a full snapshot).
_ADAPTERS: dict[str, tuple[type[ModelAdapter], ...]] = {}
_discovered = False


def register_adapter(adapter: type[ModelAdapter]) -> type[ModelAdapter]:
    """Register `adapter` for each of its `model_types`; usable as a class decorator."""
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
