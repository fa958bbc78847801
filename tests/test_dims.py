"""Nested dimensions, the space they span and sub-network specs: pure data, hand-checked."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from manyinone.core.space import DepthDim, NestedDimension, NestedSpace, SubnetSpec, even_exits
from manyinone.core.errors import ManyinoneError


@dataclass(frozen=True)
class WidthDim(NestedDimension):
    """A second axis, only so the product of several axes can be tested (the package has depth only)."""

    name: str = field(default="width", init=False)
    unit: str = field(default="neurons", init=False)


# --- DepthDim validation ----------------------------------------------------------------------
def test_depth_dim_keeps_sorted_choices_ending_at_full():
    dim = DepthDim(total=30, choices=(6, 12, 18, 24, 30))
    assert dim.choices == (6, 12, 18, 24, 30)
    assert (dim.full, dim.smallest, dim.name, dim.unit) == (30, 6, "depth", "layers")


def test_depth_dim_appends_the_full_depth():
    assert DepthDim(total=4, choices=(1, 2)).choices == (1, 2, 4)


def test_depth_dim_without_choices_is_just_the_full_model():
    dim = DepthDim(total=4)
    assert dim.choices == (4,)
    assert dim.smallest == dim.full == 4


def test_depth_dim_accepts_a_list():
    assert DepthDim(total=4, choices=[2, 4]).choices == (2, 4)


@pytest.mark.parametrize("choices, bad", [((2, 5), "[5]"), ((0, 2), "[0]"), ((-1, 4), "[-1]")])
def test_depth_dim_out_of_range_names_the_value_and_the_range(choices, bad):
    with pytest.raises(ManyinoneError) as err:
        DepthDim(total=4, choices=choices)
    msg = str(err.value)
    assert bad in msg and "1..4" in msg and "depth" in msg


@pytest.mark.parametrize("choices", [(3, 2), (2, 2, 4), (4, 1)])
def test_depth_dim_must_be_strictly_increasing(choices):
    with pytest.raises(ManyinoneError, match="strictly increasing"):
        DepthDim(total=4, choices=choices)


def test_depth_dim_unsorted_error_suggests_the_sorted_list():
    with pytest.raises(ManyinoneError, match=r"e\.g\. \[2, 3\]"):
        DepthDim(total=4, choices=(3, 2))


def test_depth_dim_rejects_non_integer_choices():
    with pytest.raises(ManyinoneError, match="out of range"):
        DepthDim(total=4, choices=(1.5, 4))


@pytest.mark.parametrize("total", [0, -3])
def test_depth_dim_total_must_be_positive(total):
    with pytest.raises(ManyinoneError, match="total must be >= 1"):
        DepthDim(total=total)


def test_dims_are_immutable():
    dim = DepthDim(total=4, choices=(2, 4))
    with pytest.raises(Exception):
        dim.total = 8  # frozen dataclass


@pytest.mark.parametrize("total, count, expected", [
    (30, 5, (6, 12, 18, 24, 30)),
    (4, 5, (1, 2, 3, 4)),  # fewer layers than exits: duplicates collapse
    (2, 5, (1, 2)),
    (12, 3, (4, 8, 12)),
])
def test_even_exits(total, count, expected):
    assert even_exits(total, count) == expected


# --- SubnetSpec -------------------------------------------------------------------------------
def test_spec_equality_and_hash_ignore_argument_order():
    a = SubnetSpec(depth=12, width=64)
    b = SubnetSpec({"width": 64}, depth=12)
    assert a == b and hash(a) == hash(b)
    assert {a: "x"}[b] == "x"
    assert len({a, b}) == 1


def test_spec_differs_by_value_and_is_not_a_plain_dict():
    assert SubnetSpec(depth=12) != SubnetSpec(depth=6)
    assert SubnetSpec(depth=12) != {"depth": 12}


def test_spec_values_are_ints():
    assert SubnetSpec(depth="12") == SubnetSpec(depth=12)


def test_spec_label_repr_and_mapping_behaviour():
    spec = SubnetSpec(width=64, depth=2)
    assert spec.label == "depth=2,width=64"  # axes sorted by name
    assert repr(spec) == "SubnetSpec(depth=2, width=64)"
    assert SubnetSpec(depth=12).label == "depth=12"
    assert spec["depth"] == 2 and len(spec) == 2 and list(spec) == ["depth", "width"]
    assert spec.to_dict() == {"depth": 2, "width": 64}
    with pytest.raises(KeyError):
        spec["heads"]


def test_spec_keyword_overrides_mapping():
    assert SubnetSpec({"depth": 2}, depth=4)["depth"] == 4


# --- NestedSpace ------------------------------------------------------------------------------
@pytest.fixture
def depth_space():
    return NestedSpace([DepthDim(total=4, choices=(1, 2, 4))])


def test_space_specs_full_smallest(depth_space):
    assert depth_space.axes == ("depth",)
    assert depth_space.specs() == [SubnetSpec(depth=1), SubnetSpec(depth=2), SubnetSpec(depth=4)]
    assert depth_space.full() == SubnetSpec(depth=4)
    assert depth_space.smallest() == SubnetSpec(depth=1)


def test_space_of_two_axes_is_the_product_smallest_first():
    space = NestedSpace([DepthDim(total=4, choices=(2, 4)), WidthDim(total=64, choices=(32, 64))])
    assert [s.label for s in space.specs()] == [
        "depth=2,width=32", "depth=2,width=64", "depth=4,width=32", "depth=4,width=64"]
    assert space.full() == SubnetSpec(depth=4, width=64)
    assert space.smallest() == SubnetSpec(depth=2, width=32)


def test_validate_fills_missing_axes_with_full(depth_space):
    assert depth_space.validate({}) == SubnetSpec(depth=4)
    assert depth_space.validate({"depth": 2}) == SubnetSpec(depth=2)
    assert depth_space.validate(SubnetSpec(depth=1)) == SubnetSpec(depth=1)


def test_validate_rejects_untrained_choice_listing_allowed(depth_space):
    with pytest.raises(ManyinoneError) as err:
        depth_space.validate({"depth": 3})
    assert "depth=3" in str(err.value) and "[1, 2, 4]" in str(err.value)


def test_validate_rejects_unknown_axis(depth_space):
    with pytest.raises(ManyinoneError) as err:
        depth_space.validate({"width": 32})
    assert "width" in str(err.value) and "depth" in str(err.value)


def test_space_rejects_duplicate_and_missing_axes():
    with pytest.raises(ManyinoneError, match="given twice"):
        NestedSpace([DepthDim(total=4), DepthDim(total=4)])
    with pytest.raises(ManyinoneError, match="at least one axis"):
        NestedSpace([])


def test_space_dict_round_trip(depth_space):
    data = depth_space.to_dict()
    assert data == {"depth": {"total": 4, "choices": [1, 2, 4]}}
    again = NestedSpace.from_dict(data)
    assert again.specs() == depth_space.specs() and again.full() == depth_space.full()


def test_space_from_dict_unknown_axis():
    with pytest.raises(ManyinoneError, match=r"unknown axis 'experts'.*known axes \['depth', 'heads', 'width'\]"):
        NestedSpace.from_dict({"experts": {"total": 4, "choices": [4]}})
