"""Cost of a sub-network and resolution of a budget (a fraction of the full cost) to a spec.

Pure functions over numbers: an adapter supplies the cost of each spec; nothing here touches a model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

from manyinone.core.space import SubnetSpec
from manyinone.core.errors import ManyinoneError
from manyinone.core.kinds import COST_METRICS


@dataclass(frozen=True)
class Cost:
    """Absolute cost of one sub-network.

    params: parameters the sub-network uses, embeddings excluded (they are a lookup, not compute).
    flops_per_token: forward FLOPs for one token (2 per multiply-add) at the reference context
        length, LM head and attention scores included.
    """

    params: int
    flops_per_token: float

    def relative_to(self, full: "Cost") -> dict[str, float]:
        """metric -> this cost as a fraction of `full`'s, for every registered metric."""
        return {name: amount(self) / amount(full) for name, amount in COST_METRICS.items()}

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


# A metric is the amount of a Cost it counts; a budget is a fraction of the full model's amount.
@COST_METRICS.register("flops")
def _flops(cost: Cost) -> float:
    """forward FLOPs per token"""
    return cost.flops_per_token


@COST_METRICS.register("params")
def _params(cost: Cost) -> float:
    """non-embedding parameters"""
    return cost.params


METRICS = COST_METRICS.names()  # the registered metrics, for index validation (core.index) and callers


def check_budget(budget: float) -> float:
    if not isinstance(budget, (int, float)) or budget != budget or not (0 < budget <= 1):
        raise ManyinoneError(f"budget {budget!r} out of range; allowed 0 < budget <= 1 (fraction of the full cost)")
    return float(budget)


def resolve_budget(costs: Mapping[SubnetSpec, float], budget: float | None) -> SubnetSpec:
    """Largest-cost spec whose relative cost fits `budget`; None means the full (most costly) spec.

    Ties break deterministically by the spec's label, so every process resolves a budget the same way.
    `costs` maps each trained spec to its relative cost in (0, 1].
    """
    if not costs:
        raise ManyinoneError("no sub-networks to choose from")
    ranked = sorted(costs.items(), key=lambda kv: (kv[1], kv[0].label))
    if budget is None:
        return ranked[-1][0]
    budget = check_budget(budget)
    # Costs compare at the 3 decimals `manyinone info` prints, so typing a printed cost selects that row.
    fitting = [spec for spec, cost in ranked if min(cost, round(cost, 3)) <= budget + 1e-9]
    if not fitting:
        smallest, cost = ranked[0]
        raise ManyinoneError(
            f"budget {budget} is below the smallest sub-model ({smallest.label}, cost {cost:.3f}); "
            f"allowed {cost:.3f} <= budget <= 1"
        )
    return fitting[-1]
