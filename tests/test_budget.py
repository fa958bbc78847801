"""Cost arithmetic and budget -> spec resolution."""

from __future__ import annotations

import math

import pytest

from manyinone.core.cost import Cost, check_budget, resolve_budget
from manyinone.core.space import SubnetSpec
from manyinone.core.errors import ManyinoneError

D1, D2, D3, D4 = (SubnetSpec(depth=d) for d in (1, 2, 3, 4))
COSTS = {D1: 0.25, D2: 0.5, D3: 0.75, D4: 1.0}


def test_cost_relative_and_dict():
    full, half = Cost(params=200, flops_per_token=1000.0), Cost(params=50, flops_per_token=400.0)
    assert half.relative_to(full) == {"params": 0.25, "flops": 0.4}
    assert full.relative_to(full) == {"params": 1.0, "flops": 1.0}
    assert half.to_dict() == {"params": 50, "flops_per_token": 400.0}


@pytest.mark.parametrize("budget, expected", [
    (1.0, D4), (1, D4), (0.99, D3), (0.75, D3), (0.6, D2), (0.5, D2), (0.25, D1), (0.3, D1),
])
def test_largest_spec_that_fits(budget, expected):
    assert resolve_budget(COSTS, budget) == expected


def test_none_means_full():
    assert resolve_budget(COSTS, None) == D4


def test_exact_cost_fits_despite_float_rounding():
    # 0.1 + 0.2 != 0.3 in floats; a spec costing "0.3" must still fit budget 0.3.
    assert resolve_budget({D1: 0.1 + 0.2, D4: 1.0}, 0.3) == D1


# Relative FLOPs of SmolLM2-135M's exits 6, 12, 18, 24, 30 (see test_cli's info test).
SMOLLM2 = {SubnetSpec(depth=d): c for d, c in
           ((6, 15 / 43), (12, 22 / 43), (18, 29 / 43), (24, 36 / 43), (30, 1.0))}


def test_a_specs_exact_cost_selects_it():
    for spec, cost in SMOLLM2.items():
        assert resolve_budget(SMOLLM2, cost) == spec


def test_a_specs_cost_as_info_prints_it_selects_it():
    # 29/43 = 0.67442 prints as 0.674: typing the printed number must not fall to depth 12.
    for spec, cost in SMOLLM2.items():
        assert resolve_budget(SMOLLM2, float(f"{cost:.3f}")) == spec


def test_a_budget_just_under_the_printed_cost_does_not_fit():
    assert resolve_budget(SMOLLM2, 0.673) == SubnetSpec(depth=12)


def test_ties_break_by_label_whatever_the_order():
    a, b = SubnetSpec(depth=2, width=8), SubnetSpec(depth=3, width=4)
    for costs in ({a: 0.5, b: 0.5, D4: 1.0}, {b: 0.5, a: 0.5, D4: 1.0}):
        # Equal cost: the larger label ("depth=3,width=4") wins, in every process.
        assert resolve_budget(costs, 0.6) == b
    assert resolve_budget({a: 1.0, b: 1.0}, None) == resolve_budget({b: 1.0, a: 1.0}, None) == b


@pytest.mark.parametrize("budget", [0, 0.0, -1, -0.5, 1.5, 1.0000001, math.nan, math.inf, -math.inf])
def test_out_of_range_budgets(budget):
    with pytest.raises(ManyinoneError) as err:
        resolve_budget(COSTS, budget)
    assert "out of range" in str(err.value) and "0 < budget <= 1" in str(err.value)
    assert repr(float(budget)) in str(err.value) or repr(budget) in str(err.value)


@pytest.mark.parametrize("budget", ["0.5", b"0.5", [0.5], complex(0.5)])
def test_non_numbers_are_rejected(budget):
    with pytest.raises(ManyinoneError, match="out of range"):
        check_budget(budget)


def test_below_smallest_names_smallest_and_its_cost():
    with pytest.raises(ManyinoneError) as err:
        resolve_budget(COSTS, 0.2)
    msg = str(err.value)
    assert "0.2" in msg and "depth=1" in msg and "0.250" in msg


def test_no_specs():
    with pytest.raises(ManyinoneError, match="no sub-networks"):
        resolve_budget({}, 0.5)


def test_check_budget_returns_float():
    assert check_budget(1) == 1.0 and isinstance(check_budget(1), float)
