"""A new axis needs only an Axis value and an adapter that offers it: proved with a toy one, built here.

Everything axis-specific lives in this file: a dimension ("inner": MLP neurons of a toy residual
LM), its `Axis` (slicing table, importance score, mask hook), and a 30-line adapter. The library's
own space, sampler, loss and optimizer step then train it; nothing in manyinone/ changed for it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from manyinone.core.adapter import ModelAdapter
from manyinone.core.axes import Axis, Slice, hooked
from manyinone.core.cost import Cost
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


class ToyAdapter(ModelAdapter):
    name, model_types, axes = "toy-inner", ("toy",), ("depth", "inner")

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
        raise NotImplementedError


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
