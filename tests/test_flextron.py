"""Elastic width and heads (Flextron adapter): dims, registry by axes, slicing parity with plain
transformers, GQA-consistent heads, costs, importance reordering, gradients."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import max_abs_diff, sample_batch
from manyinone.core.space import HeadsDim, NestedSpace, SubnetSpec, WidthDim, even_sizes
from manyinone.core.errors import ManyinoneError
from manyinone.core.registry import adapter_class, adapter_for
from manyinone.elastic.reorder import importance_orders, reorder_by_importance
from manyinone_flextron import LlamaFlextronAdapter
from manyinone_llama import LlamaDepthAdapter

# tiny models: 4 layers, hidden 64, MLP 128, 4 heads of 16 sharing 2 KV heads (groups of 2)
CHOICES = {"depth": [2, 4], "width": [32, 64, 128], "heads": [2, 4]}


def load_eval(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture
def model(any_tiny_model):
    return load_eval(any_tiny_model)


# --- dims -----------------------------------------------------------------------------------------
def test_width_and_heads_dims_round_trip_through_a_checkpoint_dict():
    space = NestedSpace([WidthDim(total=1536, choices=(384, 768)), HeadsDim(total=9, choices=(3, 6))])
    assert space.dims["width"].choices == (384, 768, 1536) and space.dims["heads"].unit == "heads"
    again = NestedSpace.from_dict(space.to_dict())
    assert again.specs() == space.specs() and again.full() == SubnetSpec(width=1536, heads=9)


def test_even_sizes_respect_the_multiple():
    assert even_sizes(1536, 4, 64) == (384, 768, 1152, 1536)
    assert even_sizes(9, 3, 3) == (3, 6, 9)
    assert all(s % 3 == 0 for s in even_sizes(24, 5, 3))


# --- registry: two adapters for llama, chosen by axes ------------------------------------------------
def test_registry_picks_the_adapter_by_axes(model):
    assert adapter_class("llama") is LlamaDepthAdapter  # depth-only keeps the plain depth adapter
    assert type(adapter_for(model)) is LlamaDepthAdapter
    assert type(adapter_for(model, ["depth"])) is LlamaDepthAdapter
    assert type(adapter_for(model, ["width"])) is LlamaFlextronAdapter
    assert type(adapter_for(model, ["depth", "width", "heads"])) is LlamaFlextronAdapter
    with pytest.raises(ManyinoneError, match=r"axes \['experts'\] not supported .*'llama-flextron'"):
        adapter_for(model, ["experts"])


# --- slicing parity ---------------------------------------------------------------------------------
@torch.no_grad()
def test_every_spec_equals_its_extracted_plain_model(model):
    ids, mask = sample_batch()  # the last row is right-padded
    adapter = adapter_for(model, CHOICES)
    space = adapter.space(CHOICES)
    hidden = adapter.forward_nested(ids, mask, space.specs())
    plain_full = model(input_ids=ids, attention_mask=mask).logits
    assert max_abs_diff(adapter.exit_logits(hidden[space.full()]), plain_full) <= 1e-5
    seen = set()
    for spec in space.specs():
        sub = adapter.extract(spec)
        assert (sub.config.intermediate_size, sub.config.num_attention_heads, sub.config.num_key_value_heads) == \
            (spec["width"], spec["heads"], spec["heads"] // 2)
        logits = adapter.exit_logits(hidden[spec])  # [batch, seq, vocab]
        assert max_abs_diff(logits, sub(input_ids=ids, attention_mask=mask).logits) <= 1e-5, spec
        seen.add(round(float(logits.abs().sum()), 3))
    assert len(seen) == len(space.specs())  # the specs really compute different functions
    # The model is whole again: its own Parameters, full shapes, same output.
    assert all(isinstance(p, torch.nn.Parameter) for p in model.parameters())
    assert model.model.layers[0].mlp.gate_proj.weight.shape == (128, 64)
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, plain_full)


@torch.no_grad()
def test_exported_width_model_loads_in_plain_transformers(tiny_qwen2, tmp_path):
    model = load_eval(tiny_qwen2)  # attention biases: sliced with their heads
    adapter = LlamaFlextronAdapter(model)
    spec = SubnetSpec(depth=3, width=64, heads=2)
    sub = adapter.extract(spec)
    sub.save_pretrained(tmp_path / "half")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "half", dtype=torch.float32).eval()
    assert again.config.intermediate_size == 64 and again.config.num_hidden_layers == 3
    assert again.model.layers[0].self_attn.k_proj.bias.shape == (16,)
    ids, mask = sample_batch(seed=3)
    nested = adapter.exit_logits(adapter.forward_nested(ids, mask, [spec])[spec])
    assert max_abs_diff(again(input_ids=ids, attention_mask=mask).logits, nested) <= 1e-5


def test_heads_keep_whole_query_groups_and_their_kv_head(tiny_llama):
    adapter = LlamaFlextronAdapter(load_eval(tiny_llama))
    attn = adapter.base.layers[0].self_attn
    sub = adapter.extract(SubnetSpec(heads=2))  # one group: query heads 0, 1 and KV head 0
    sub_attn = sub.model.layers[0].self_attn
    assert torch.equal(sub_attn.q_proj.weight, attn.q_proj.weight[:32])
    assert torch.equal(sub_attn.k_proj.weight, attn.k_proj.weight[:16])
    assert torch.equal(sub_attn.v_proj.weight, attn.v_proj.weight[:16])
    assert torch.equal(sub_attn.o_proj.weight, attn.o_proj.weight[:, :32])
    assert sub_attn.num_key_value_groups == 2
    with pytest.raises(ManyinoneError, match=r"heads choices \[1\]: need multiples of 2.*allowed \[2, 4\]"):
        adapter.space({"heads": [1]})
    with pytest.raises(ManyinoneError, match="layer 1: width=64, heads=3 out of range"):
        adapter.check_plan(((64, 2), (64, 3)))


def test_gradients_reach_only_the_kept_units(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).train()
    adapter = LlamaFlextronAdapter(model)
    ids, mask = sample_batch()
    spec = SubnetSpec(width=32, heads=2)
    adapter.exit_logits(adapter.forward_nested(ids, mask, [spec])[spec]).sum().backward()
    gate = model.model.layers[0].mlp.gate_proj.weight.grad  # [128, 64]
    assert gate.shape == (128, 64) and gate[:32].abs().sum() > 0 and gate[32:].abs().sum() == 0
    k = model.model.layers[0].self_attn.k_proj.weight.grad
    assert k[:16].abs().sum() > 0 and k[16:].abs().sum() == 0


# --- costs ------------------------------------------------------------------------------------------
def test_cost_by_hand_and_full_spec_matches_the_depth_adapter(tiny_llama):
    model = load_eval(tiny_llama)
    adapter = LlamaFlextronAdapter(model)
    # depth 2, width 32, heads 2 (1 KV head of 16): q 64x32, k 64x16, v 64x16, o 32x64, MLP 3 x 64x32
    matmul = 64 * 32 + 64 * 16 * 2 + 32 * 64 + 3 * 64 * 32
    cost = adapter.cost(SubnetSpec(depth=2, width=32, heads=2))
    assert cost.params == 2 * (matmul + 2 * 64) + 64
    assert cost.flops_per_token == 2 * (2 * matmul + 100 * 64) + 2 * 4 * 512 * 32
    depth_only = LlamaDepthAdapter(model)
    for d in (1, 4):
        assert adapter.cost(SubnetSpec(depth=d)) == depth_only.cost(SubnetSpec(depth=d))
    # A per-layer plan costs the sum of its layers.
    mixed = adapter.plan_cost(((128, 4), (32, 2)))
    full_layer = 64 * 64 * 2 + 64 * 32 * 2 + 64 * 128 * 3 + 2 * 64
    assert mixed.params == 64 + full_layer + (matmul + 2 * 64)
    assert mixed.flops_per_token == 2 * 100 * 64 + sum(adapter.layer_cost(i, {"width": w, "heads": h})[1] for i, (w, h) in enumerate(((128, 4), (32, 2))))


# --- importance reordering ----------------------------------------------------------------------------
def test_importance_orders_sort_descending_with_stable_ties():
    orders = importance_orders([{"width": torch.tensor([1.0, 3.0, 3.0, 0.5]), "heads": torch.tensor([0.0, 2.0])}])
    assert orders[0]["width"].tolist() == [1, 2, 0, 3] and orders[0]["heads"].tolist() == [1, 0]


@torch.no_grad()
def test_reordering_keeps_the_full_model_and_puts_important_units_first(model):
    ids, mask = sample_batch(seed=5)
    before = model(input_ids=ids, attention_mask=mask).logits
    adapter = LlamaFlextronAdapter(model)
    calibration = [sample_batch(seed=s) for s in range(3)]
    orders = reorder_by_importance(adapter, calibration)
    assert any(not torch.equal(o["width"], torch.arange(128)) for o in orders)  # something actually moved
    after = model(input_ids=ids, attention_mask=mask).logits
    assert max_abs_diff(before, after) <= 1e-5
    # Now the scores come out sorted: every prefix holds the most important units.
    total = [adapter.unit_importance(*b) for b in calibration]
    for layer in range(4):
        neurons = sum(t[layer]["width"] for t in total)
        groups = sum(t[layer]["heads"] for t in total)
        assert torch.all(neurons[:-1] >= neurons[1:] - 1e-4) and torch.all(groups[:-1] >= groups[1:] - 1e-4)
