"""Axis-keyed importance reordering reproduces the (width, heads) reordering the library shipped.

The oracle is written out here with plain tensor indexing, independent of `core.axes`: a neuron's
score is the energy of its activation entering down_proj, a KV group's the energy of its query
heads' outputs entering o_proj (real tokens only, summed over the calibration batches); units are
sorted most important first (ties: lower index first), and every weight and bias row/column that
belongs to a unit moves with it. This is the formula of the pair-based code before scores were
keyed by axis; the test was run against that code before the change and passed there.
"""

from __future__ import annotations

import pytest
import torch

from helpers import sample_batch
from manyinone.elastic.reorder import reorder_by_importance
from manyinone_flextron import LlamaFlextronAdapter
from transformers import AutoModelForCausalLM


def _energies(model, calibration):
    """Per layer, (neuron energies [intermediate], KV-group energies [kv_heads]) over `calibration`."""
    cfg = model.config
    kv = cfg.num_key_value_heads
    totals = [[0.0, 0.0] for _ in model.model.layers]

    def hook(i, slot, groups):
        def record(_module, inputs):
            act = inputs[0].float() * record.keep  # [batch, seq, features]
            energy = act.pow(2).sum((0, 1))
            totals[i][slot] = totals[i][slot] + (energy if groups is None else energy.view(groups, -1).sum(-1))
        return record

    hooks = []
    for i, layer in enumerate(model.model.layers):
        hooks += [(layer.mlp.down_proj, hook(i, 0, None)), (layer.self_attn.o_proj, hook(i, 1, kv))]
    handles = [m.register_forward_pre_hook(h) for m, h in hooks]
    try:
        with torch.no_grad():
            for ids, mask in calibration:
                for _, h in hooks:
                    h.keep = mask.unsqueeze(-1).float()
                model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return totals


def _expected_weights(model, calibration):
    """Every elastic tensor of every layer as the old reordering leaves it ({name: tensor}), and the
    per-layer orders ({"width": neuron order, "heads": KV-group order})."""
    cfg = model.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    q_rows = heads // kv * head_dim  # q_proj rows (= o_proj columns) of one KV group
    expected, orders = {}, []
    for i, (layer, (neurons, groups)) in enumerate(zip(model.model.layers, _energies(model, calibration))):
        n_order = torch.sort(neurons, descending=True, stable=True).indices
        g_order = torch.sort(groups, descending=True, stable=True).indices
        orders.append({"width": n_order, "heads": g_order})
        q_index = (g_order[:, None] * q_rows + torch.arange(q_rows)).flatten()
        kv_index = (g_order[:, None] * head_dim + torch.arange(head_dim)).flatten()
        for name, module, dim, index in (("mlp.gate_proj", layer.mlp.gate_proj, 0, n_order),
                                          ("mlp.up_proj", layer.mlp.up_proj, 0, n_order),
                                          ("mlp.down_proj", layer.mlp.down_proj, 1, n_order),
                                          ("self_attn.q_proj", layer.self_attn.q_proj, 0, q_index),
                                          ("self_attn.k_proj", layer.self_attn.k_proj, 0, kv_index),
                                          ("self_attn.v_proj", layer.self_attn.v_proj, 0, kv_index),
                                          ("self_attn.o_proj", layer.self_attn.o_proj, 1, q_index)):
            expected[f"{i}.{name}.weight"] = module.weight.detach().index_select(dim, index)
            if module.bias is not None and dim == 0:
                expected[f"{i}.{name}.bias"] = module.bias.detach().index_select(0, index)
            elif module.bias is not None:
                expected[f"{i}.{name}.bias"] = module.bias.detach().clone()  # an output bias does not move
    return expected, orders


@torch.no_grad()
def test_axis_keyed_reordering_moves_every_weight_as_the_pair_based_code_did(any_tiny_model):
    model = AutoModelForCausalLM.from_pretrained(any_tiny_model, dtype=torch.float32).eval()
    calibration = [sample_batch(seed=s) for s in range(3)]
    expected, expected_orders = _expected_weights(model, calibration)
    orders = reorder_by_importance(LlamaFlextronAdapter(model), calibration)
    assert len(orders) == len(expected_orders)
    for got_layer, want_layer in zip(orders, expected_orders):  # one order per axis, keyed by its name
        assert got_layer.keys() == {"width", "heads"}
        assert all(torch.equal(got_layer[a], want_layer[a]) for a in want_layer)
    layers = model.model.layers
    got = {f"{i}.{name}": p for i, layer in enumerate(layers) for name, p in layer.named_parameters()
           if f"{i}.{name}" in expected}
    assert got.keys() == expected.keys()
    for name, want in expected.items():
        torch.testing.assert_close(got[name], want, rtol=0, atol=0, msg=name)  # bit-identical
    original = AutoModelForCausalLM.from_pretrained(any_tiny_model, dtype=torch.float32).model.layers
    moved = sum(not torch.equal(got[n], dict(original.named_parameters())[n]) for n in expected)
    assert moved > 0  # the calibration really moved units (the oracle is not the identity)


def test_bad_orders_and_scores_are_refused_in_one_line(tiny_llama):
    from manyinone.core.errors import ManyinoneError
    from manyinone.elastic.reorder import check_scores

    adapter = LlamaFlextronAdapter(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32))
    identity = [{name: torch.arange(axis.groups) for name, axis in adapter.layer_axes.items()}] * adapter.num_layers
    with pytest.raises(ManyinoneError, match=r"permute: 3 layer orders for 4 layers"):
        adapter.permute(identity[:3])
    with pytest.raises(ManyinoneError, match=r"layer 0 orders axes \['experts'\]; allowed \['width', 'heads'\]"):
        adapter.permute([{"experts": torch.arange(2)}] + identity[1:])
    before = {n: p.clone() for n, p in adapter.model.named_parameters()}
    swap = {"width": torch.arange(128).flip(0), "heads": torch.tensor([1, 0])}  # valid, but the last layer's is not
    with pytest.raises(ManyinoneError, match=r"axis 'heads': order \[1, 1\] is not a permutation of its 2 unit groups"):
        adapter.permute([swap] * 3 + [{"heads": torch.tensor([1, 1])}])
    assert all(torch.equal(p, before[n]) for n, p in adapter.model.named_parameters())  # nothing moved
    with pytest.raises(ManyinoneError, match=r"layer 0, axis 'width': shape \(64,\), expected \(128,\)"):
        check_scores([{"width": torch.ones(64)}], adapter.layer_axes)
