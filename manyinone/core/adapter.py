"""The contract between manyinone's core and one model architecture.

An adapter knows one architecture (which modules are layers, neurons, heads) and nothing about
the CLI, the data or the training loop. The core only calls the methods below.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
from torch import nn

from manyinone.core.cost import Cost
from manyinone.core.space import NestedSpace, SubnetSpec
from manyinone.core.errors import ManyinoneError
from manyinone.train.lean_loss import LinearHead


class ModelAdapter(ABC):
    """Wraps one loaded HF causal LM and exposes it as a nested space of sub-networks.

    Subclasses set `name`, the HF `model_types` they serve and the `axes` they support, and are
    registered with `manyinone.core.registry.register_adapter` (or the `manyinone.adapters` entry point).
    """

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    axes: ClassVar[tuple[str, ...]]

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def check_axes(self, axes: Sequence[str]) -> tuple[str, ...]:
        missing = [a for a in axes if a not in self.axes]
        if missing or not axes:
            raise ManyinoneError(
                f"axes {list(axes)} not supported by the {self.name!r} adapter; allowed: {list(self.axes)}"
            )
        return tuple(axes)

    @abstractmethod
    def space(self, choices: Mapping[str, Sequence[int] | None]) -> NestedSpace:
        """The nested space over `choices` (axis -> trained sizes, None for the adapter's default)."""

    @abstractmethod
    def forward_nested(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, specs: Sequence[SubnetSpec]
    ) -> dict[SubnetSpec, torch.Tensor]:
        """One forward pass; returns each spec's last hidden state before the final norm.

        input_ids, attention_mask: [batch, seq]. Returned tensors: [batch, seq, hidden].
        """

    @abstractmethod
    def exit_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's own final norm and LM head: [..., hidden] -> [..., vocab]."""

    def linear_head(self) -> LinearHead | None:
        """`exit_logits` split as (final norm, LM head weight) for the memory-lean loss.

        None (the default) when the head is not one bias-free linear map; the loss then calls
        `exit_logits`. Called after each forward pass (FSDP2 swaps in unsharded weights there).
        """
        return None

    @abstractmethod
    def cost(self, spec: SubnetSpec, context: int = 512) -> Cost:
        """Parameters and forward FLOPs per token of `spec` at `context` tokens of attention."""

    @abstractmethod
    def extract(self, spec: SubnetSpec) -> nn.Module:
        """A plain HF model computing exactly `spec`, sharing tensors with the wrapped model."""
