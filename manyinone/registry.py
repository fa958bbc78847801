"""Adapters by HF `model_type`, registered explicitly or discovered through entry points.

Built-in adapters use the same `manyinone.adapters` entry-point group as third-party ones, so
`pip install my-adapter` is all a user needs to teach manyinone a new architecture.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from torch import nn

from manyinone.adapter import ModelAdapter
from manyinone.errors import ManyinoneError

ENTRY_POINT_GROUP = "manyinone.adapters"
_ADAPTERS: dict[str, type[ModelAdapter]] = {}
_discovered = False


def register_adapter(adapter: type[ModelAdapter]) -> type[ModelAdapter]:
    """Register `adapter` for each of its `model_types`; usable as a class decorator."""
    if not (isinstance(adapter, type) and issubclass(adapter, ModelAdapter)):
        raise ManyinoneError(f"{adapter!r} is not a ModelAdapter subclass")
    for model_type in adapter.model_types:
        other = _ADAPTERS.get(model_type)
        if other is not None and other is not adapter:
            raise ManyinoneError(
                f"model_type {model_type!r} already served by {other.name!r}; cannot also register {adapter.name!r}"
            )
        _ADAPTERS[model_type] = adapter
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


def adapter_class(model_type: str) -> type[ModelAdapter]:
    _discover()
    if model_type not in _ADAPTERS:
        raise ManyinoneError(
            f"unknown model type {model_type!r}; registered: {registered_model_types()} "
            f"(add one with manyinone.registry.register_adapter)"
        )
    return _ADAPTERS[model_type]


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The registered adapter wrapping `model`, chosen by `model.config.model_type`."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return adapter_class(str(model_type))(model)
