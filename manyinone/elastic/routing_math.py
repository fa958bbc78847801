"""The routers' pure math (static, per-prompt and per-token alike): prefix masks from a distribution
over options, a distribution's expected cost, and the budget penalty."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from manyinone.core.errors import ManyinoneError


# --- pure math --------------------------------------------------------------------------------
def expected_cost(probs: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Expected cost of a routing distribution. probs: [batch, layers, options]; table: [layers,
    options] cost of each option in each layer (any unit: relative FLOPs, ms). Returns [batch]."""
    return (probs * table).sum(dim=(1, 2))


def prefix_masks(probs: torch.Tensor, sizes: torch.Tensor, total: int) -> torch.Tensor:
    """Soft prefix masks: unit j is kept with the probability that the chosen option keeps >= j+1 units.

    probs: [batch, layers, options]; sizes: [options] units each option keeps. Returns [batch, layers, total];
    for a one-hot `probs` it is exactly 1 on the chosen prefix and 0 after it.
    """
    keep = (torch.arange(total, device=probs.device)[None, :] < sizes.to(probs.device)[:, None]).to(probs.dtype)  # [options, total]
    return probs @ keep  # [batch, layers, total]


def budget_penalty(expected: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """Mean squared gap between expected relative cost and the budget ([batch] each): both sides
    count, so the router neither overspends nor wastes the budget it was given."""
    return (expected - budget).pow(2).mean()




def check_training_inputs(batches: Sequence, budgets: Sequence[float], what: str) -> None:
    """What every router's training refuses up front: no batches, or a budget outside (0, 1]."""
    if not batches:
        raise ManyinoneError(f"{what} needs at least one batch")
    bad = [b for b in budgets if not 0 < b <= 1]
    if bad:
        raise ManyinoneError(f"router budgets {bad} out of range; allowed 0 < budget <= 1")
