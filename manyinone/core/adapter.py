"""The contract between manyinone's core and one model architecture.

An adapter knows one architecture (which modules are layers, neurons, heads) and nothing about
the CLI, the data or the training loop. The core only calls what is declared here:

* `ModelAdapter`: every adapter (depth exits, cost, export, the runtime's `decoder_stack`);
* `PlanAdapter`: adapters with per-layer plans over their `layer_axes` (the router, latency tables, routing);
* `Reorderable`: adapters that can sort their units by importance before elastic training.

The two protocols are checked with `isinstance` where they are needed, so an adapter that lacks a
method is refused with one line naming the protocol, not an AttributeError deep inside a loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from manyinone.core.axes import Axis, LayerPlan, LayerSizes
from manyinone.core.cost import Cost
from manyinone.core.space import NestedSpace, SubnetSpec
from manyinone.core.errors import ManyinoneError
from manyinone.train.lean_loss import LinearHead


Option = LayerSizes  # one layer's size per axis (a SubnetSpec, e.g. {"width": 768, "heads": 9}); see core.axes


@dataclass
class DecoderStack:
    """The model's own pieces the runtime drives, handed over by the adapter (`decoder_stack`).

    embed(ids [batch, q], positions [batch, q]) -> hidden [batch, q, hidden], with whatever the
    architecture does there (scaling, learned positions); layers: the decoder layers, each called as
    transformers calls them (hidden, attention_mask=, position_ids=, past_key_values=, use_cache=,
    position_embeddings=); rotary(hidden, positions) -> the (cos, sin) the layers take, or None;
    head(hidden) -> logits through the model's own final norm and LM head; kv_heads, head_dim: the
    KV cache's shape per layer. The hidden state an exit sees is taken before the final norm.
    sliced(plan): for adapters with per-layer plans, a context manager inside which the first
    len(plan) layers compute that plan's sizes (one SubnetSpec per layer) as views of the one copy of
    the weights (None: the runtime serves depth only).
    fused_layers(): optional, an explicit opt-in the runtime performs only when its decode step is
    compiled (`Runtime(fused=True)`): it may re-home the layers' weights (as views, same values, no
    copy) and returns one decode forward per layer, called like the layers; None: the fused step
    calls the layers themselves. The token router's mixed steps also pass `unit_mask=` ([batch, q or 1,
    intermediate], a 0/1 scale of each MLP neuron per row), which a fused forward must apply before
    the down projection.
    """

    embed: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    layers: Sequence[nn.Module]
    rotary: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None
    head: Callable[[torch.Tensor], torch.Tensor]
    kv_heads: int
    head_dim: int
    sliced: Callable[[LayerPlan], AbstractContextManager[None]] | None = None
    fused_layers: Callable[[], Sequence[Callable[..., torch.Tensor]]] | None = None


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
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, specs: Sequence[SubnetSpec],
        position_ids: torch.Tensor | None = None,
    ) -> dict[SubnetSpec, torch.Tensor]:
        """One forward pass; returns each spec's last hidden state before the final norm.

        input_ids, attention_mask: [batch, seq]. Returned tensors: [batch, seq, hidden].
        position_ids [batch, seq] (packed rows, attention_mask None): positions restart at each packed
        example, and the model must keep attention inside each one (transformers' models build that
        block-diagonal mask from position_ids when attention_mask is None). Only packed training passes it.
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

    def exit_block(self, index: int) -> tuple[nn.Module, nn.Module]:
        """(norm, mlp) for exit_heads="block": fresh copies of decoder layer `index`'s feed-forward half
        whose output is zero, so the block h + mlp(norm(h)) starts as the identity."""
        raise ManyinoneError(f"exit_heads='block' needs decoder layers with a feed-forward half; the {self.name!r} "
                             "adapter offers none (use exit_heads=translator)")

    def append_exit_block(self, sub: nn.Module, norm: nn.Module, mlp: nn.Module) -> None:
        """Append to extracted sub-model `sub` one plain decoder layer computing h + mlp(norm(h))."""
        raise ManyinoneError(f"the {self.name!r} adapter cannot export exit blocks as decoder layers")

    def exit_layer(self, index: int) -> nn.Module:
        """A decoder layer for exit_heads="layer": a fresh copy of decoder layer `index` whose attention
        and feed-forward outputs are zero, so it starts as the identity. It is called with the keyword
        arguments of the exit's last layer (`train.exit_heads.forward_nested`)."""
        raise ManyinoneError(f"exit_heads='layer' needs decoder layers it can copy; the {self.name!r} adapter "
                             "offers none (use exit_heads=translator or block)")

    def append_exit_layer(self, sub: nn.Module, layer: nn.Module) -> None:
        """Append exit layer `layer` (a copy) to extracted sub-model `sub` as its last decoder layer."""
        raise ManyinoneError(f"the {self.name!r} adapter cannot export exit layers as decoder layers")

    def decoder_stack(self) -> DecoderStack:
        """The pieces the runtime's KV-cached decoding drives (`DecoderStack`); adapters whose
        models the runtime cannot drive keep this default, and the runtime refuses them in one line."""
        raise ManyinoneError(f"the {self.name!r} adapter hands the runtime no decoder stack; "
                             "serve an exported model through transformers instead")


@runtime_checkable
class PlanAdapter(Protocol):
    """An adapter with per-layer plans over its `layer_axes`: what the router, latency tables and
    routed generation call (see adapters/manyinone_flextron). A plan is a tuple of SubnetSpec, one per
    kept layer, keyed by the names in `layer_axes`; nothing here names an axis, so a new axis is a new
    `layer_axes` entry in the adapters that support it."""

    name: str
    num_layers: int  # decoder layers
    layer_axes: Mapping[str, Axis]  # the per-layer axes by name; each Axis's `total` is its full size

    def plan(self, spec: Mapping[str, int]) -> LayerPlan: ...

    def check_plan(self, plan: Sequence[Mapping[str, int]]) -> LayerPlan:
        """The plan as a tuple of SubnetSpec naming every layer axis (ones it leaves out at full size),
        or one line naming the bad layer, axis and size."""

    def forward_plan(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, plan: LayerPlan) -> torch.Tensor: ...

    def masked(self, masks: Mapping[str, torch.Tensor | None]) -> AbstractContextManager[None]:
        """Within the block, scale each layer's units of axis name by masks[name]: [batch, layers, total]
        per sequence or [batch, seq, layers, total] per token; an axis left out (or None) is untouched."""

    def sequence_context(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor: ...

    def option_costs(self, options: Sequence[Option], context: int = 512,
                     metric: str = "flops") -> tuple[torch.Tensor, float]: ...

    def extract_plan(self, plan: LayerPlan) -> nn.Module: ...

    def exit_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...


# Per layer, axis name -> one score per unit group of that axis ([axis.groups], e.g. {"width":
# [intermediate], "heads": [kv_heads]}); the sorted orders have the same shape (core.axes.unit_scores).
LayerScores = Sequence[Mapping[str, torch.Tensor]]


@runtime_checkable
class Reorderable(Protocol):
    """What an adapter offers for importance reordering: one score vector per `layer_axes` entry, and
    the permutation applied through each Axis (core.axes.unit_scores / permute_units do both)."""

    name: str
    layer_axes: Mapping[str, Axis]

    def unit_importance(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> LayerScores:
        """Per layer, {axis name: energy of each unit group [axis.groups]} over one batch's real tokens."""

    def permute(self, orders: LayerScores) -> None:
        """Per layer, reorder each named axis's unit groups in place (new group k = old order[k])."""


def require_plans(adapter, what: str) -> PlanAdapter:
    """`adapter` as a PlanAdapter, or one line saying `what` needs per-layer plans."""
    if not isinstance(adapter, PlanAdapter):
        missing = [m for m in ("plan", "check_plan", "forward_plan", "masked", "sequence_context", "option_costs",
                               "extract_plan", "num_layers", "layer_axes") if not hasattr(adapter, m)]
        raise ManyinoneError(f"the {adapter.name!r} adapter has no per-layer plans (PlanAdapter lacks {missing}); "
                             f"{what} needs a checkpoint trained with width/heads axes")
    return adapter
