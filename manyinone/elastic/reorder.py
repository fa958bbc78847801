"""Importance reordering before elastic training (Flextron, Minitron): sort each layer's units so
that every prefix (the first n MLP neurons, the first k attention groups) keeps the most important.

Scores come from the adapter (activation energy of each unit on calibration batches); the sorting
is a pure function here; the adapter applies the permutation to its own weights. The full model
computes the same function before and after, only the meaning of "the first n units" changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from manyinone.core.adapter import LayerScores, Reorderable
from manyinone.core.errors import ManyinoneError
from manyinone.train.progress import TrainProgress

def importance_orders(scores: LayerScores) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the unit indices sorted from most to least important (ties: lower index first)."""
    return [(torch.sort(n, descending=True, stable=True).indices, torch.sort(g, descending=True, stable=True).indices)
            for n, g in scores]


def accumulate(total: LayerScores | None, batch: LayerScores) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if total is None:
        return [(n.clone(), g.clone()) for n, g in batch]
    return [(tn + n, tg + g) for (tn, tg), (n, g) in zip(total, batch)]


@torch.no_grad()
def reorder_by_importance(adapter, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                          show_progress: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Score units on calibration `batches` ((input_ids, attention_mask) pairs, [batch, seq]),
    permute the adapter's model so that prefixes keep the most important units; returns the orders."""
    if not isinstance(adapter, Reorderable):
        raise ManyinoneError(f"the {adapter.name!r} adapter cannot reorder units by importance (width/heads axes need it)")
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
    orders = importance_orders(total)
    adapter.permute(orders)
    adapter.model.train(was_training)
    return orders
