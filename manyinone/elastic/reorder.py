"""Importance reordering before elastic training (Flextron, Minitron): sort each layer's units so
that every prefix (the first n MLP neurons, the first k attention groups) keeps the most important.

Scores are keyed by axis: per layer, one vector per entry of the adapter's `layer_axes` (the
activation energy of each unit group at the axis's `entry`, on calibration batches; see
`core.axes.unit_scores`). The sorting is a pure function here, over whatever axes the scores name;
the adapter applies the permutation to its own weights through each Axis (`core.axes.permute_units`),
so a new axis is scored and reordered with no edit in this module. The full model
computes the same function before and after, only the meaning of "the first n units" changes.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from manyinone.core.adapter import LayerScores, Reorderable
from manyinone.core.errors import ManyinoneError
from manyinone.train.progress import TrainProgress


def importance_orders(scores: LayerScores) -> list[dict[str, torch.Tensor]]:
    """Per layer and axis, the unit-group indices sorted from most to least important (ties: lower index first)."""
    return [{name: torch.sort(s, descending=True, stable=True).indices for name, s in layer.items()} for layer in scores]


def check_scores(scores: LayerScores, axes) -> None:
    """Scores name only the adapter's axes (`axes`: name -> Axis), one value per unit group of each."""
    for i, layer in enumerate(scores):
        for name, s in layer.items():
            if name not in axes:
                raise ManyinoneError(f"importance scores of layer {i} name axis {name!r}; the adapter's axes are {list(axes)}")
            if tuple(s.shape) != (axes[name].groups,):
                raise ManyinoneError(f"importance scores of layer {i}, axis {name!r}: shape {tuple(s.shape)}, "
                                     f"expected ({axes[name].groups},) (one per unit group)")


def accumulate(total: LayerScores | None, batch: LayerScores) -> list[dict[str, torch.Tensor]]:
    """`total` plus one batch's scores, layer by layer and axis by axis (both must name the same axes)."""
    if total is None:
        return [{name: s.clone() for name, s in layer.items()} for layer in batch]
    if len(total) != len(batch) or any(t.keys() != b.keys() for t, b in zip(total, batch)):
        raise ManyinoneError(f"importance scores changed shape between batches: {[sorted(t) for t in total]} "
                             f"then {[sorted(b) for b in batch]} (layers x axes); every batch must score the same axes")
    return [{name: t + layer[name] for name, t in acc.items()} for acc, layer in zip(total, batch)]


@torch.no_grad()
def reorder_by_importance(adapter, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                          show_progress: bool = False) -> list[dict[str, torch.Tensor]]:
    """Score units on calibration `batches` ((input_ids, attention_mask) pairs, [batch, seq]),
    permute the adapter's model so that prefixes keep the most important units; returns the orders
    (per layer, {axis name: order [axis.groups]}, one entry per axis of the adapter's `layer_axes`)."""
    if not isinstance(adapter, Reorderable):
        raise ManyinoneError(f"the {adapter.name!r} adapter cannot reorder units by importance (Reorderable: layer_axes, "
                             "unit_importance, permute); elastic axes need it")
    batches = list(batches)
    if not batches:
        raise ManyinoneError("importance reordering needs at least one calibration batch")
    was_training = adapter.model.training
    adapter.model.eval()
    total = None
    with TrainProgress(len(batches), [], enabled=show_progress, description="importance") as progress:
        for i, (ids, mask) in enumerate(batches):
            total = accumulate(total, adapter.unit_importance(ids, mask))
            progress.update(i + 1, {})
    check_scores(total, adapter.layer_axes)
    orders = importance_orders(total)
    adapter.permute(orders)
    adapter.model.train(was_training)
    return orders
