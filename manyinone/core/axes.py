"""An elastic axis inside a layer (ModelOpt's hyper-parameter + dynamic module, in one object).

An `Axis` owns everything about one prefix-nested axis of a decoder layer: the tensors it slices
(`Slice`: which dimension, how many rows per unit), where its units enter the layer's output
projection (importance is measured there, and the router's soft masks scale it there), and how
units group (grouped-query attention keeps whole query groups with their KV head). Adapters build
one Axis per axis they support from their own module names; the machinery below is generic, so a
new axis (elastic hidden size, MoE experts) is a new Axis value plus the adapter that offers it.
Importance is axis-keyed too: `unit_scores` scores every axis of a layer stack in one forward pass
({axis name: one energy per unit group}) and `permute_units` applies the sorted orders axis by axis.

A per-layer plan (`LayerPlan`) is a tuple of `SubnetSpec`, one per kept layer, bottom first, keyed by
axis name ({"width": w, "heads": h} for the Flextron adapter); each axis reads its own size from it, so
the plan machinery (router, latency tables, index, runtime) never lists the axes. On disk a plan is
stored compactly as lists of sizes in the order of an explicit axis list (`encode_plan`); files written
before axes were named hold (width, heads) pairs, which is that list's default (`PAIR_AXES`).
Module paths are relative to one decoder layer.

Example:
    >>> width = Axis("width", total=11008, entry="mlp.down_proj",
    ...              slices=(Slice("mlp.up_proj.weight", 0), Slice("mlp.down_proj.weight", 1)))
    >>> width.kept(width.slices[0], 4096)       # rows of up_proj a 4096-neuron sub-layer keeps
    4096
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from manyinone.core.errors import ManyinoneError
from manyinone.core.space import SubnetSpec

LayerSizes = SubnetSpec  # one layer's size per axis, e.g. SubnetSpec(width=768, heads=9)
LayerPlan = tuple[SubnetSpec, ...]  # one LayerSizes per kept layer, bottom first
# The axis order of plans, options and latency keys stored before axes were named: a bare pair is
# (width, heads). Still the default list order on disk, so those files read and write unchanged.
PAIR_AXES = ("width", "heads")


@dataclass(frozen=True)
class Slice:
    """One tensor an axis narrows: `tensor` (path in the layer), along `dim`; a kept unit keeps
    `per_unit` rows of it, and `shared` units share one such row block (KV heads: query heads per KV head)."""

    tensor: str
    dim: int
    per_unit: int = 1
    shared: int = 1


@dataclass(frozen=True)
class Axis:
    """One elastic axis of every decoder layer (see the module docstring).

    total: units per layer at full size; entry: the module whose *input* carries one slot of
    `unit_size` features per unit (importance and masks act there); group: units that are permuted
    (and scored) together.
    """

    name: str
    total: int
    entry: str
    slices: tuple[Slice, ...]
    unit_size: int = 1
    group: int = 1
    tensors: dict[str, Slice] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.total % self.group:
            raise ManyinoneError(f"axis {self.name!r}: total {self.total} is not a multiple of group {self.group}")
        object.__setattr__(self, "tensors", {s.tensor: s for s in self.slices})

    # --- sizes ------------------------------------------------------------------------------
    def check(self, size: int) -> None:
        if not (1 <= size <= self.total and size % self.group == 0):
            raise ManyinoneError(f"{self.name}={size} out of range; allowed multiples of {self.group} up to {self.total}")

    def kept(self, s: Slice, size: int) -> int:
        """Rows of tensor `s` that `size` units keep."""
        return size // s.shared * s.per_unit

    def params_kept(self, s: Slice, numel: int, full_rows: int, size: int) -> int:
        """Parameters of a tensor with `numel` elements and `full_rows` along s.dim that `size` keeps."""
        return numel // full_rows * self.kept(s, size)

    # --- slicing ----------------------------------------------------------------------------
    def views(self, layer: nn.Module, size: int) -> list[tuple[nn.Module, str, torch.Tensor]]:
        """(module, parameter name, narrowed view) for every tensor of `layer` this axis cuts at `size`."""
        out = []
        for s in self.slices:
            owner, _, leaf = s.tensor.rpartition(".")
            module = layer.get_submodule(owner)
            param = getattr(module, leaf, None)
            keep = self.kept(s, size)
            if param is not None and keep != param.shape[s.dim]:
                out.append((module, leaf, param.narrow(s.dim, 0, keep)))
        return out

    # --- importance and permutation ---------------------------------------------------------------
    def score_hook(self, record: Callable[[torch.Tensor], None], keep: torch.Tensor) -> Callable:
        """A forward pre-hook for `entry` that records each unit group's activation energy
        ([total // group]) over the real tokens (`keep`: [batch, seq, 1])."""
        def hook(_module, inputs):
            act = inputs[0].float() * keep  # [batch, seq, total * unit_size]
            energy = act.pow(2).sum(dim=(0, 1))  # [total * unit_size]
            record(energy.view(self.groups, -1).sum(-1))  # [groups]
        return hook

    def row_index(self, s: Slice, order: torch.Tensor) -> torch.Tensor:
        """Indices along s.dim that put unit group order[k] at position k ([rows])."""
        rows = self.group // s.shared * s.per_unit  # rows of `s` per unit group
        return (order.long().cpu()[:, None] * rows + torch.arange(rows)).flatten()

    @property
    def groups(self) -> int:
        """Unit groups per layer: the length of this axis's score vector and permutation."""
        return self.total // self.group

    def check_order(self, order: torch.Tensor) -> None:
        """`order` must be a permutation of this axis's unit groups, or one line saying it is not."""
        order = torch.as_tensor(order)
        if order.shape != (self.groups,) or not torch.equal(order.long().sort().values.cpu(), torch.arange(self.groups)):
            raise ManyinoneError(f"axis {self.name!r}: order {order.tolist()} is not a permutation of its "
                                 f"{self.groups} unit groups (0..{self.groups - 1}, each once)")

    @torch.no_grad()
    def permute(self, layer: nn.Module, order: torch.Tensor) -> None:
        """Reorder this axis's unit groups in `layer` in place: new group k = old group order[k]."""
        self.check_order(order)
        for s in self.slices:
            owner, _, leaf = s.tensor.rpartition(".")
            param = getattr(layer.get_submodule(owner), leaf, None)
            if param is not None:
                param.copy_(param.index_select(s.dim, self.row_index(s, order).to(param.device)))

    # --- soft masks (the router) -------------------------------------------------------------------
    def mask_hook(self, mask: torch.Tensor) -> Callable:
        """A forward pre-hook for `entry` scaling unit j by mask[..., j]: mask [batch, total] (one per
        sequence) or [batch, seq, total] (one per token, the token router's). A 0/1 prefix mask
        computes exactly the sliced layer; on a layer already sliced to fewer units the mask's
        prefix of that length applies (a prefix mask keeps its meaning). The mask is read when the
        hook runs, so a CUDA graph recorded through it reads the mask tensor's later contents."""

        def hook(_module, inputs):
            x = inputs[0]  # [batch, seq, kept features]
            f = mask if self.unit_size == 1 else mask.repeat_interleave(self.unit_size, dim=-1)
            f = f if f.dim() == 3 else f[:, None, :]  # [batch, seq or 1, total * unit_size]
            return (x * f[..., : x.shape[-1]].to(x.dtype),)
        return hook


def hooked(layers: Sequence[nn.Module], axis: Axis, make_hook: Callable[[int], Callable]) -> list:
    """Register `make_hook(i)` as a forward pre-hook on `axis.entry` of every layer i; returns the handles."""
    return [layer.get_submodule(axis.entry).register_forward_pre_hook(make_hook(i)) for i, layer in enumerate(layers)]


# --- importance: one score vector per axis, keyed by axis name --------------------------------------
@torch.no_grad()
def unit_scores(layers: Sequence[nn.Module], axes: Mapping[str, Axis], attention_mask: torch.Tensor,
                run: Callable[[], object]) -> list[dict[str, torch.Tensor]]:
    """Per layer, every axis's unit-group energies ([axis.groups]) from one forward pass `run()` over a
    batch whose real tokens `attention_mask` ([batch, seq]) marks: each axis's `score_hook` on its
    `entry` in every layer, so an adapter scores whatever axes it declares without naming them."""
    keep = attention_mask.unsqueeze(-1).to(torch.float32)  # [batch, seq, 1]
    scores: list[dict[str, torch.Tensor]] = [{} for _ in layers]  # per layer: axis name -> [axis.groups]

    def make_hook(axis: Axis) -> Callable[[int], Callable]:
        return lambda i: axis.score_hook(lambda energy: scores[i].__setitem__(axis.name, energy), keep)

    handles = []
    try:
        for axis in axes.values():
            handles += hooked(layers, axis, make_hook(axis))
        run()
    finally:
        for h in handles:
            h.remove()
    for i, layer_scores in enumerate(scores):
        missing = [name for name in axes if name not in layer_scores]
        if missing:
            raise ManyinoneError(f"layer {i}: the forward pass never reached the entry of axes {missing}, "
                                 f"so they have no importance scores (entries {[axes[n].entry for n in missing]})")
    return scores


@torch.no_grad()
def permute_units(layers: Sequence[nn.Module], axes: Mapping[str, Axis],
                  orders: Sequence[Mapping[str, torch.Tensor]]) -> None:
    """Reorder every layer's units in place, axis by axis (new group k = old group order[k]); an axis a
    layer's orders leave out keeps its order, one the adapter does not declare is refused. Every order
    is checked before any weight moves, so a bad one leaves the model as it was."""
    if len(orders) != len(layers):
        raise ManyinoneError(f"permute: {len(orders)} layer orders for {len(layers)} layers")
    for i, layer_orders in enumerate(orders):
        unknown = sorted(set(layer_orders) - set(axes))
        if unknown:
            raise ManyinoneError(f"permute: layer {i} orders axes {unknown}; allowed {list(axes)}")
        for name, order in layer_orders.items():
            axes[name].check_order(order)
    for layer, layer_orders in zip(layers, orders):
        for name, axis in axes.items():
            if name in layer_orders:
                axis.permute(layer, layer_orders[name])


# --- plans: axis-keyed in memory, sizes in an explicit axis order on disk -------------------------
def axis_order(names: Iterable[str]) -> tuple[str, ...]:
    """A stable order for writing axes as list positions: PAIR_AXES first (so width/heads files keep
    their old layout), any other axis after them by name."""
    names = set(names)
    return tuple(a for a in PAIR_AXES if a in names) + tuple(sorted(names - set(PAIR_AXES)))


def layer_sizes(sizes: Mapping[str, int] | Sequence[int], axes: Sequence[str] = PAIR_AXES) -> SubnetSpec:
    """One layer's sizes as a SubnetSpec: from a mapping (axis -> size), or from a list of sizes in
    `axes` order (the stored form; a bare pair is the old (width, heads))."""
    if isinstance(sizes, Mapping):
        return sizes if isinstance(sizes, SubnetSpec) else SubnetSpec(sizes)
    sizes = list(sizes)
    if len(sizes) != len(axes) or not all(isinstance(v, int) or hasattr(v, "__index__") for v in sizes):
        raise ManyinoneError(f"layer sizes {sizes!r} do not match the axes {list(axes)}; expected one integer per axis "
                             "or a mapping axis -> size")
    return SubnetSpec(dict(zip(axes, (int(v) for v in sizes))))


def as_plan(plan: Iterable[Mapping[str, int] | Sequence[int]], axes: Sequence[str] = PAIR_AXES) -> LayerPlan:
    """A per-layer plan as a tuple of SubnetSpec (each layer a mapping, or sizes in `axes` order)."""
    return tuple(layer_sizes(o, axes) for o in plan)


def plan_axes(options: Iterable[Mapping[str, int]]) -> tuple[str, ...]:
    """The axes a set of layer sizes names (all of them must name the same ones), in `axis_order`."""
    names = {tuple(sorted(o)) for o in options}
    if len(names) != 1:
        raise ManyinoneError(f"layer sizes name different axes {sorted(names)}; every option needs the same axes")
    return axis_order(next(iter(names)))


def encode_sizes(sizes: Mapping[str, int], axes: Sequence[str]) -> list[int]:
    """One layer's sizes as the stored list, in `axes` order."""
    return [int(sizes[a]) for a in axes]


def encode_plan(plan: Iterable[Mapping[str, int]], axes: Sequence[str]) -> list[list[int]]:
    """A plan as stored: one list of sizes per layer, in `axes` order."""
    return [encode_sizes(o, axes) for o in plan]


def widest(plans: Sequence[LayerPlan]) -> LayerPlan:
    """Per layer, the largest size of each axis over `plans` (all of one length): the one sliced pass
    that contains every plan (the rest masked off per row or token)."""
    return tuple(SubnetSpec({a: max(p[i][a] for p in plans) for a in plans[0][i]}) for i in range(len(plans[0])))


__all__ = ["Axis", "LayerPlan", "LayerSizes", "PAIR_AXES", "Slice", "as_plan", "axis_order", "encode_plan",
           "encode_sizes", "hooked", "layer_sizes", "permute_units", "plan_axes",
           "unit_scores", "widest"]
