"""A new axis needs only an Axis value and an adapter that offers it: proved with a toy one, built here.

Everything axis-specific lives in this file: a dimension ("inner": MLP neurons of a toy residual
LM), its `Axis` (slicing table, importance score, mask hook), and a small adapter. The library's
own space, sampler, loss and optimizer step then train it; `elastic.reorder` scores and reorders it
by importance (Reorderable, through the axis's entry and slicing table); its per-layer plans (PlanAdapter) go
through the library's router (training, hard masks, save/load), latency table (measure, price, file
round trip, ms budgets) and budget index (stored routed plans) unchanged: nothing in manyinone/
names the axis.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from contextlib import contextmanager

from manyinone.core.adapter import ModelAdapter, PlanAdapter, require_plans
from manyinone.core.axes import Axis, Slice, encode_plan, hooked, permute_units, unit_scores
from manyinone.core.cost import Cost
from manyinone.core.errors import ManyinoneError
from manyinone.core.space import DepthDim, NestedDimension, NestedSpace, SubnetSpec, register_dimension
from manyinone.train.losses import exit_weights, nested_loss, supervised_positions
from manyinone.train.samplers import make_sampler

VOCAB, HIDDEN, INNER, LAYERS = 50, 16, 32, 3


@dataclass(frozen=True)
class InnerDim(NestedDimension):
    name: str = field(default="inner", init=False)
    unit: str = field(default="neurons", init=False)


INNER_AXIS = Axis("inner", INNER, entry="down", slices=(Slice("up.weight", 0), Slice("up.bias", 0), Slice("down.weight", 1)))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(HIDDEN, INNER), nn.Linear(INNER, HIDDEN, bias=False)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class ToyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.layers = nn.Embedding(VOCAB, HIDDEN), nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm, self.head = nn.LayerNorm(HIDDEN), nn.Linear(HIDDEN, VOCAB, bias=False)
        self.config = SimpleNamespace(vocab_size=VOCAB)  # what an HF model has and the latency timer reads


@contextmanager
def _swapped(layers, plan):
    """Each layer i computes plan[i]["inner"] neurons: the axis's own slicing table, swapped in."""
    saved = []
    try:
        for layer, sizes in zip(layers, plan):
            for module, leaf, view in INNER_AXIS.views(layer, sizes["inner"]):
                saved.append((module, leaf, module._parameters.pop(leaf)))
                setattr(module, leaf, view)
        yield
    finally:
        for module, leaf, param in reversed(saved):
            delattr(module, leaf)
            module._parameters[leaf] = param


class ToyAdapter(ModelAdapter):
    name, model_types, axes = "toy-inner", ("toy",), ("depth", "inner")
    num_layers, layer_axes = LAYERS, {"inner": INNER_AXIS}  # what PlanAdapter asks for

    def space(self, choices: Mapping[str, Sequence[int] | None]) -> NestedSpace:
        return NestedSpace([DepthDim(total=LAYERS, choices=tuple(choices["depth"])),
                            InnerDim(total=INNER, choices=tuple(choices["inner"]))])

    def forward_nested(self, input_ids, attention_mask, specs):
        out = {}
        for spec in specs:
            saved = []
            for layer in self.model.layers:  # the axis's own slicing table, swapped in for one pass
                for module, leaf, view in INNER_AXIS.views(layer, spec["inner"]):
                    saved.append((module, leaf, module._parameters.pop(leaf)))
                    setattr(module, leaf, view)
            try:
                hidden = self.model.embed(input_ids)
                for layer in self.model.layers[: spec["depth"]]:
                    hidden = layer(hidden)
            finally:
                for module, leaf, param in reversed(saved):
                    delattr(module, leaf)
                    module._parameters[leaf] = param
            out[spec] = hidden  # [batch, seq, hidden], before the final norm
        return out

    def exit_logits(self, hidden):
        return self.model.head(self.model.norm(hidden))

    def cost(self, spec, context=512):
        per_layer = sum(INNER_AXIS.params_kept(s, p.numel(), p.shape[s.dim], spec["inner"])
                        for s in INNER_AXIS.slices for p in [dict(self.model.layers[0].named_parameters())[s.tensor]])
        return Cost(params=spec["depth"] * per_layer, flops_per_token=2.0 * spec["depth"] * per_layer)

    def extract(self, spec):
        return self.extract_plan(self.plan(spec))

    # --- per-layer plans (PlanAdapter): what the router and latency tables drive ------------------
    def plan(self, spec):
        return (SubnetSpec(inner=spec.get("inner", INNER)),) * spec.get("depth", LAYERS)

    def check_plan(self, plan):
        plan = tuple(SubnetSpec({"inner": INNER, **sizes}) for sizes in plan)
        for sizes in plan:
            INNER_AXIS.check(sizes["inner"])
        return plan

    def forward_plan(self, input_ids, attention_mask, plan):
        plan = self.check_plan(plan)
        with _swapped(self.model.layers, plan):
            hidden = self.model.embed(input_ids)
            for layer in self.model.layers[: len(plan)]:
                hidden = layer(hidden)
        return hidden  # [batch, seq, hidden]

    @contextmanager
    def masked(self, masks):
        handles = hooked(self.model.layers, INNER_AXIS, lambda i: INNER_AXIS.mask_hook(masks["inner"][:, i]))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def sequence_context(self, input_ids, attention_mask):
        return self.model.embed(input_ids).mean(1)  # [batch, hidden]

    def option_costs(self, options, context=512, metric="flops"):
        full = self.cost(SubnetSpec(depth=LAYERS, inner=INNER)).params
        row = [self.cost(SubnetSpec(depth=1, inner=o["inner"])).params / full for o in options]
        return torch.tensor([row] * LAYERS, dtype=torch.float64), 0.0  # [layers, options]; no cost outside the layers

    # --- importance reordering (Reorderable): the library's axis-keyed scoring and permutation -----
    def unit_importance(self, input_ids, attention_mask):
        return unit_scores(self.model.layers, self.layer_axes, attention_mask,
                           lambda: self.forward_plan(input_ids, attention_mask, self.plan({})))

    def permute(self, orders):
        permute_units(self.model.layers, self.layer_axes, orders)

    def extract_plan(self, plan):
        import copy

        sub = copy.deepcopy(self.model)
        sub.layers = sub.layers[: len(plan)]
        for layer, sizes in zip(sub.layers, self.check_plan(plan)):
            for module, leaf, view in INNER_AXIS.views(layer, sizes["inner"]):
                setattr(module, leaf, nn.Parameter(view.detach().clone()))
        return sub


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 7), generator=g)
    return ids, torch.ones_like(ids), ids.clone()


@pytest.fixture
def inner_registered(monkeypatch):
    """The new axis's dimension, registered into a copy of the registry discarded after the test."""
    import manyinone.core.space as space_module

    monkeypatch.setattr(space_module, "DIMENSIONS", dict(space_module.DIMENSIONS))
    register_dimension(InnerDim)


def test_a_toy_axis_trains_one_step_through_the_library(inner_registered):
    torch.manual_seed(0)
    adapter = ToyAdapter(ToyLM())
    space = adapter.space({"depth": [2, 3], "inner": [8, 32]})
    assert NestedSpace.from_dict(space.to_dict()).to_dict() == space.to_dict()  # the new axis reads back
    specs = make_sampler("all", space, seed=0).sample(0)
    assert {s["inner"] for s in specs} == {8, 32}
    ids, mask, labels = _batch()
    hidden = adapter.forward_nested(ids, mask, specs)
    feats, targets = {}, None
    for spec, h in hidden.items():
        feats[spec], targets = supervised_positions(h, labels)
    out = nested_loss(feats, adapter.exit_logits, targets, exit_weights(specs, None))
    before = adapter.model.layers[0].up.weight.detach().clone()
    optimizer = torch.optim.SGD(adapter.model.parameters(), lr=0.5)
    out.total.backward()
    grad = adapter.model.layers[0].up.weight.grad
    assert torch.isfinite(out.total) and grad[8:].abs().sum() > 0 and grad[:8].abs().sum() > 0
    optimizer.step()
    assert not torch.equal(adapter.model.layers[0].up.weight, before)
    # Costs grow along the new axis.
    small, big = (adapter.cost(SubnetSpec(depth=3, inner=n)).params for n in (8, 32))
    assert small < big


def test_the_axis_masks_and_importance_agree_with_its_slicing():
    torch.manual_seed(1)
    model = ToyLM()
    layer, x = model.layers[0], torch.randn(2, 5, HIDDEN)
    with torch.no_grad():
        sliced = x + torch.relu(x @ layer.up.weight[:8].T + layer.up.bias[:8]) @ layer.down.weight[:, :8].T
        mask = (torch.arange(INNER) < 8).float().expand(2, INNER)  # [batch, inner] keeps the first 8
        (handle,) = hooked([layer], INNER_AXIS, lambda i: INNER_AXIS.mask_hook(mask))
        masked = layer(x)
        handle.remove()
        torch.testing.assert_close(masked, sliced)
        scores = []
        (handle,) = hooked([layer], INNER_AXIS, lambda i: INNER_AXIS.score_hook(scores.append, torch.ones(2, 5, 1)))
        full = layer(x)
        handle.remove()
        order = torch.sort(scores[0], descending=True, stable=True).indices
        INNER_AXIS.permute(layer, order)
        torch.testing.assert_close(layer(x), full)  # the same function, units reordered
        assert (torch.relu(x @ layer.up.weight.T + layer.up.bias)).pow(2).sum((0, 1)).diff().le(1e-5).all()


@torch.no_grad()
def test_the_toy_axis_is_scored_and_reordered_by_the_library():
    """elastic.reorder scores the new axis at its entry and moves its units, with no edit outside this file:
    the orders and weights equal the toy oracle's (neuron energy = relu(up(x))^2 over real tokens)."""
    from manyinone.core.adapter import Reorderable
    from manyinone.elastic.reorder import reorder_by_importance

    torch.manual_seed(2)
    adapter = ToyAdapter(ToyLM())
    assert isinstance(adapter, Reorderable)
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randint(0, VOCAB, (2, 6), generator=g), torch.tensor([[1] * 6, [1] * 4 + [0] * 2])) for _ in range(2)]
    # The oracle, by hand: each layer's input from the full forward, each neuron's energy on real tokens.
    energy = [torch.zeros(INNER) for _ in range(LAYERS)]
    for ids, mask in batches:
        hidden = adapter.model.embed(ids)
        for i, layer in enumerate(adapter.model.layers):
            energy[i] += (torch.relu(layer.up(hidden)) * mask[..., None]).pow(2).sum((0, 1))
            hidden = layer(hidden)
    want = [torch.sort(e, descending=True, stable=True).indices for e in energy]
    before = [{n: p.clone() for n, p in layer.named_parameters()} for layer in adapter.model.layers]
    full = _plan_logits(adapter, adapter.plan({}), batches[0][0])

    orders = reorder_by_importance(adapter, batches)

    assert [set(o) for o in orders] == [{"inner"}] * LAYERS
    assert all(torch.equal(o["inner"], w) for o, w in zip(orders, want))
    assert any(not torch.equal(w, torch.arange(INNER)) for w in want)  # the calibration really moves units
    for layer, old, w in zip(adapter.model.layers, before, want):
        assert torch.equal(layer.up.weight, old["up.weight"][w]) and torch.equal(layer.up.bias, old["up.bias"][w])
        assert torch.equal(layer.down.weight, old["down.weight"][:, w])
    torch.testing.assert_close(_plan_logits(adapter, adapter.plan({}), batches[0][0]), full)  # same function
    again = [adapter.unit_importance(*b) for b in batches]  # now every prefix holds the most energetic neurons
    for i in range(LAYERS):
        scores = sum(a[i]["inner"] for a in again)
        assert torch.all(scores[:-1] >= scores[1:] - 1e-5)


@torch.no_grad()
def _plan_logits(adapter, plan, ids):
    return adapter.exit_logits(adapter.forward_plan(ids, torch.ones_like(ids), plan))


def test_the_toy_axis_goes_through_router_latency_and_index_unchanged(inner_registered, tmp_path, monkeypatch):
    """Plans keyed by the new axis: router masks equal slicing, the router trains, saves and loads; a
    latency table measures, prices and reads back its options; an index stores and serves its plans."""
    import manyinone.elastic.latency as latency
    from manyinone.core.index import parse_index
    from manyinone.elastic.router import (Router, RouterTraining, load_router, plan_relative_cost, prefix_masks,
                                          save_router, train_router)

    torch.manual_seed(0)
    adapter = require_plans(ToyAdapter(ToyLM()), "the toy axis")
    assert isinstance(adapter, PlanAdapter)
    options = [SubnetSpec(inner=8), SubnetSpec(inner=16), SubnetSpec(inner=32)]
    ids, _, labels = _batch()
    # A hard (one-hot) choice entering as the router's prefix masks computes the sliced mixed plan.
    plan = (options[0], options[2], options[1])
    onehot = torch.zeros(2, LAYERS, len(options))  # [batch, layers, options]
    for i, o in enumerate(plan):
        onehot[:, i, options.index(o)] = 1
    masks = {"inner": prefix_masks(onehot, torch.tensor([o["inner"] for o in options]), INNER)}  # [batch, layers, inner]
    with adapter.masked(masks):
        masked = _plan_logits(adapter, adapter.plan({}), ids)
    torch.testing.assert_close(masked, _plan_logits(adapter, plan, ids))
    sub = adapter.extract_plan(plan)  # a plain copy of the mixed plan
    hidden = sub.embed(ids)
    for layer in sub.layers:
        hidden = layer(hidden)
    torch.testing.assert_close(_plan_logits(adapter, plan, ids), sub.head(sub.norm(hidden)))
    assert not torch.allclose(masked, _plan_logits(adapter, adapter.plan({}), ids))  # the masks really cut

    # The library's router trains over the axis and returns plans keyed by it.
    router = Router(LAYERS, options)
    assert router.axes == ("inner",)
    table, rest = adapter.option_costs(options)
    before = [p.detach().clone() for p in router.parameters()]
    log = train_router(router, adapter, [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}],
                       table, RouterTraining(budgets=[0.3, 1.0], steps=3, fixed_cost=rest))
    assert len(log) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert any(not torch.equal(a, b) for a, b in zip(before, router.parameters()))
    routed = router.plan(0.5)
    assert len(routed) == LAYERS and all(o in options for o in routed)
    assert 0 < plan_relative_cost(routed, table, options, rest) <= 1 + 1e-6
    save_router(router, tmp_path)
    again = load_router(tmp_path)
    assert again.options == options and again.axes == ("inner",) and again.plan(0.5) == routed

    # A latency table over the axis: one key per option in the table's own axis order.
    monkeypatch.setattr(latency, "_timed_ms", lambda fn, device, repeats, warmup: _fake_ms(fn, adapter))
    measured = latency.measure_latency(adapter, options, batch=1, seq=4, repeats=1, warmup=0)
    assert measured["axes"] == ["inner"] and measured["layer_ms"] == pytest.approx({"8": 0.25, "16": 0.5, "32": 1.0})
    latency.save_table(measured, tmp_path / "latency.json")
    read = latency.load_table(tmp_path / "latency.json")
    full_plan = adapter.plan({})
    assert latency.plan_ms(read, plan) == pytest.approx(measured["rest_ms"] + 0.25 + 1.0 + 0.5)
    ms_table, ms_rest = latency.option_table(read, options, LAYERS, full_plan)  # shares of the full plan's 5 ms
    assert ms_table.shape == (LAYERS, 3) and ms_table[0].tolist() == pytest.approx([0.05, 0.1, 0.2])
    assert float(ms_table[:, 2].sum()) + ms_rest == pytest.approx(1.0)

    # A budget index storing the router's plans serves them back keyed by the axis.
    space = adapter.space({"depth": [2, 3], "inner": [8, 32]})
    costs = {s: adapter.cost(s).params for s in space.specs()}
    top = max(costs.values())
    index = {"format": "manyinone/1", "adapter": adapter.name, "model_type": "toy", "space": space.to_dict(),
             "metric": "params", "specs": [{"spec": s.to_dict(), "params": c, "flops_per_token": 2.0 * c,
                                            "relative": {"params": c / top, "flops": c / top}} for s, c in costs.items()],
             "router": {"options": encode_plan(options, router.axes), "axes": list(router.axes)},
             "routed": [{"budget": 0.5, "plan": encode_plan(routed, router.axes),
                         "relative": plan_relative_cost(routed, table, options, rest)}]}
    parsed = parse_index(index, "toy index")
    assert parsed.routed_plan(1.0) == routed
    # ms budgets resolve through the same table: the fastest sub-network is the shallow, narrow one.
    smallest = min(costs.values()) / top
    assert latency.index_budget_for_ms(index, read, latency.plan_ms(read, adapter.plan({"depth": 2, "inner": 8}))) \
        == pytest.approx(smallest)
    bad = {**index, "routed": [{**index["routed"][0], "plan": [[8, 8]] * LAYERS}]}
    with pytest.raises(ManyinoneError, match=r"routed\[0\]\.plan\[0\]: 2 sizes for the axes \['inner'\]"):
        parse_index(bad, "toy index")


def _fake_ms(fn, adapter):
    """A deterministic clock for the latency test: 2 ms outside the layers, inner / 32 ms per layer."""
    seen = []
    real = adapter.forward_plan
    adapter.forward_plan = lambda ids, mask, plan: seen.append(plan) or real(ids, mask, plan)
    try:
        fn()
    finally:
        del adapter.forward_plan
    plan = seen[0]
    return 2.0 + sum(o["inner"] for o in plan) / 32


def test_a_new_axis_takes_its_trained_sizes_from_the_config_without_a_field_of_its_own(inner_registered):
    from manyinone.train.config import TrainConfig

    cfg = TrainConfig(model="m", axes=["depth", "inner"], exits=[2, 3], sizes={"inner": [8, 32]})
    assert cfg.axis_choices() == {"depth": [2, 3], "inner": [8, 32]}
    space = ToyAdapter(ToyLM()).space(cfg.axis_choices())
    assert {s["inner"] for s in make_sampler("all", space, seed=0).sample(0)} == {8, 32}
    for sizes, said in (({"inner": [32, 8]}, "strictly increasing"), ({"width": [8]}, "use widths"),
                        ({"experts": [2]}, "does not train")):
        with pytest.raises(ValueError, match=said):
            TrainConfig(model="m", axes=["depth", "inner"], sizes=sizes)
