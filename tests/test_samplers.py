"""Samplers: which specs get a loss term at a step; a pure function of (seed, step)."""

from __future__ import annotations

import pytest

from manyinone.core.space import DepthDim, NestedSpace, SubnetSpec
from manyinone.core.errors import ManyinoneError
from manyinone.train.samplers import AllSpecs, RandomK, Sandwich, make_sampler

STEPS = range(40)


@pytest.fixture
def space():
    # 6 specs: depth 1..5 and the full 6.
    return NestedSpace([DepthDim(total=6, choices=(1, 2, 3, 4, 5, 6))])


def _in_space_order(space, chosen):
    order = space.specs()
    return [order.index(s) for s in chosen] == sorted(order.index(s) for s in chosen)


def test_all_specs_every_step(space):
    sampler = AllSpecs(space)
    assert all(sampler.sample(step) == space.specs() for step in STEPS)


@pytest.mark.parametrize("make", [
    lambda sp, seed: RandomK(sp, seed=seed, k=2),
    lambda sp, seed: RandomK(sp, seed=seed, k=3, include_full=False),
    lambda sp, seed: Sandwich(sp, seed=seed, n_random=2),
])
def test_deterministic_per_seed_and_step_and_stateless(space, make):
    forward = [make(space, 7).sample(step) for step in STEPS]
    # A fresh sampler, asked in reverse order (like a resumed run or another rank), draws the same.
    fresh = make(space, 7)
    backward = [fresh.sample(step) for step in reversed(STEPS)][::-1]
    assert forward == backward
    # Steps differ from each other, and another seed gives another sequence.
    assert len({tuple(s) for s in forward}) > 1
    assert [make(space, 8).sample(step) for step in STEPS] != forward


def test_random_k_includes_full_plus_k_others(space):
    sampler = RandomK(space, seed=0, k=2)
    for step in STEPS:
        chosen = sampler.sample(step)
        assert space.full() in chosen
        assert len(chosen) == 3 and len(set(chosen)) == 3
        assert _in_space_order(space, chosen)


def test_random_k_without_full_draws_exactly_k(space):
    sampler = RandomK(space, seed=0, k=2, include_full=False)
    draws = [sampler.sample(step) for step in STEPS]
    assert all(len(d) == 2 and len(set(d)) == 2 for d in draws)
    assert any(space.full() not in d for d in draws)


def test_random_k_covers_the_pool_over_steps(space):
    sampler = RandomK(space, seed=0, k=1)
    seen = {s for step in STEPS for s in sampler.sample(step)}
    assert seen == set(space.specs())


@pytest.mark.parametrize("k", [0, 6, -1])
def test_random_k_out_of_range(space, k):
    # With the full spec always added, the pool holds the 5 other specs.
    with pytest.raises(ManyinoneError, match=rf"k={k} out of range; allowed 1..5"):
        RandomK(space, k=k)


def test_sandwich_always_has_full_and_smallest(space):
    sampler = Sandwich(space, seed=3, n_random=1)
    for step in STEPS:
        chosen = sampler.sample(step)
        assert chosen[0] == space.smallest() and chosen[-1] == space.full()
        assert len(chosen) == 3 and len(set(chosen)) == 3
        assert _in_space_order(space, chosen)


def test_sandwich_n_random_zero_and_more_than_middle(space):
    assert Sandwich(space, n_random=0).sample(5) == [SubnetSpec(depth=1), SubnetSpec(depth=6)]
    assert Sandwich(space, n_random=99).sample(5) == space.specs()


def test_sandwich_on_a_single_spec_space():
    space = NestedSpace([DepthDim(total=4)])
    assert Sandwich(space, n_random=2).sample(0) == [SubnetSpec(depth=4)]


def test_sandwich_negative_n_random(space):
    with pytest.raises(ManyinoneError, match="n_random=-1"):
        Sandwich(space, n_random=-1)


def test_make_sampler(space):
    assert isinstance(make_sampler("all", space, seed=0), AllSpecs)
    assert make_sampler("random-k", space, seed=1, k=2).sample(4) == RandomK(space, seed=1, k=2).sample(4)
    assert make_sampler("sandwich", space, seed=1, n_random=1).sample(4) == Sandwich(space, seed=1).sample(4)
    with pytest.raises(ManyinoneError) as err:
        make_sampler("greedy", space, seed=0)
    assert "'greedy'" in str(err.value) and "['all', 'random-k', 'sandwich']" in str(err.value)
