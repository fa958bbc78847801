"""The learned router: mask and cost math by hand, cost accounting against the adapter, hard
masks equal to sliced sub-networks, training towards a budget, static export served by load."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import manyinone
from helpers import max_abs_diff, sample_batch
from manyinone.io.checkpoint import read_index
from manyinone.train.data import collate, load_records, tokenize_records
from manyinone.core.errors import ManyinoneError
from manyinone.elastic.router import (Router, RouterTraining, budget_penalty, expected_cost, export_routed,
                              plan_relative_cost, prefix_masks, train_router)
from manyinone.core.axes import as_plan
from manyinone_flextron import LlamaFlextronAdapter

OPTIONS = list(as_plan([(32, 2), (64, 2), (128, 4)]))  # (width, heads): tiny model, MLP 128, 4 heads in 2 KV groups


def test_prefix_masks_by_hand():
    probs = torch.tensor([[[1.0, 0.0], [0.25, 0.75]]])  # [batch 1, layers 2, options 2]
    masks = prefix_masks(probs, torch.tensor([1, 3]), total=4)  # [1, 2, 4]
    assert masks[0, 0].tolist() == [1.0, 0.0, 0.0, 0.0]  # one-hot: exactly the first unit
    assert masks[0, 1].tolist() == [1.0, 0.75, 0.75, 0.0]


def test_expected_cost_and_penalty_by_hand():
    probs = torch.tensor([[[0.5, 0.5], [1.0, 0.0]]])  # [1, 2, 2]
    table = torch.tensor([[0.1, 0.3], [0.2, 0.4]])  # [layers, options]
    assert expected_cost(probs, table).tolist() == pytest.approx([0.5 * 0.1 + 0.5 * 0.3 + 0.2])
    assert budget_penalty(torch.tensor([0.5, 0.2]), torch.tensor([0.4, 0.4])).item() == pytest.approx((0.01 + 0.04) / 2)


@pytest.fixture
def adapter(tiny_llama):
    return LlamaFlextronAdapter(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval())


def test_router_cost_accounting_matches_the_adapters_costs(adapter):
    full = adapter.cost(adapter.space({"width": None}).full())
    for metric, total in (("flops", full.flops_per_token), ("params", full.params)):
        table, rest = adapter.option_costs(OPTIONS, metric=metric)  # [layers, options]
        assert table.shape == (4, 3) and 0 < rest < 1
        assert plan_relative_cost(as_plan([(128, 4)] * 4), table, OPTIONS, rest) == pytest.approx(1.0)
        plan = as_plan(((32, 2), (128, 4), (64, 2), (32, 2)))
        exact = adapter.plan_cost(plan)
        want = (exact.flops_per_token if metric == "flops" else exact.params) / total
        assert plan_relative_cost(plan, table, OPTIONS, rest) == pytest.approx(want, rel=1e-6)
        # expected_cost of a one-hot distribution is the same number.
        onehot = torch.zeros(1, 4, 3)
        for i, o in enumerate(plan):
            onehot[0, i, OPTIONS.index(o)] = 1
        assert float(expected_cost(onehot, table)) + rest == pytest.approx(want, rel=1e-5)


@torch.no_grad()
def test_hard_masks_compute_exactly_the_sliced_mixed_plan(adapter):
    ids, mask = sample_batch()
    plan = as_plan(((32, 2), (128, 4), (64, 2), (128, 2)))
    options = list(as_plan([(32, 2), (64, 2), (128, 2), (128, 4)]))
    onehot = torch.zeros(3, 4, 4)  # [batch, layers, options]
    for i, o in enumerate(plan):
        onehot[:, i, options.index(o)] = 1
    neuron = prefix_masks(onehot, torch.tensor([o["width"] for o in options]), 128)
    heads = prefix_masks(onehot, torch.tensor([o["heads"] for o in options]), 4)
    full_plan = as_plan(((128, 4),) * 4)
    with adapter.masked({"width": neuron, "heads": heads}):
        masked = adapter.exit_logits(adapter.forward_plan(ids, mask, full_plan))
    sliced = adapter.exit_logits(adapter.forward_plan(ids, mask, plan))
    extracted = adapter.extract_plan(plan)(input_ids=ids, attention_mask=mask).logits
    assert max_abs_diff(masked, sliced, mask) <= 1e-5 and max_abs_diff(sliced, extracted) <= 1e-5
    assert max_abs_diff(sliced, adapter.exit_logits(adapter.forward_plan(ids, mask, full_plan))) > 1e-3


def demo_batches(tokenizer, n=4):
    examples = tokenize_records(load_records("demo", None), tokenizer, 256, "alpaca")
    return [collate(examples[i * 4:(i + 1) * 4], tokenizer.pad_token_id) for i in range(n)]


def test_static_router_learns_to_spend_its_budget(adapter, char_tokenizer):
    torch.manual_seed(0)
    router = Router(adapter.num_layers, OPTIONS)
    table, rest = adapter.option_costs(OPTIONS)
    before = plan_relative_cost(router.plan(0.45), table, OPTIONS, rest)
    log = train_router(router, adapter, demo_batches(char_tokenizer), table,
                       RouterTraining(budgets=[0.45, 1.0], steps=40, lr=0.05, cost_weight=50.0, fixed_cost=rest))
    assert len(log) == 40 and all(math.isfinite(r["loss"]) for r in log)
    low, high = (plan_relative_cost(router.plan(b), table, OPTIONS, rest) for b in (0.45, 1.0))
    assert low < high and abs(low - 0.45) < abs(before - 0.45) + 1e-9 and low <= 0.6
    assert all(not p.requires_grad for p in adapter.model.parameters())  # the model stayed frozen


def test_input_adaptive_router_trains_on_the_sequence_context(adapter, char_tokenizer):
    torch.manual_seed(0)
    router = Router(adapter.num_layers, OPTIONS, context_size=64)
    table, rest = adapter.option_costs(OPTIONS)
    first = router.layers[0][0].weight.detach().clone()  # [hidden, 1 + context]
    log = train_router(router, adapter, demo_batches(char_tokenizer, 2), table,
                       RouterTraining(budgets=[0.5], steps=4, fixed_cost=rest), context_fn=adapter.sequence_context)
    assert len(log) == 4 and all(math.isfinite(r["ce"]) for r in log)
    ids, mask = sample_batch()
    plan = router.plan(0.5, adapter.sequence_context(ids[:1], mask[:1]))
    assert len(plan) == 4 and all(o in OPTIONS for o in plan)
    # The context is really used: training moved the weights that read it, and two inputs differ.
    assert not torch.allclose(router.layers[0][0].weight[:, 1:], first[:, 1:])
    contexts = adapter.sequence_context(ids, mask)  # [batch, hidden]
    logits = router(torch.tensor([0.5, 0.5]), contexts[:2])  # [2, layers, options]
    assert not torch.allclose(logits[0], logits[1])
    with pytest.raises(ManyinoneError, match="needs the input's context"):
        router.plan(0.5)


@pytest.fixture(scope="module")
def width_run(tiny_llama, tmp_path_factory):
    from manyinone.train.config import TrainConfig
    from manyinone.train.loop import train

    cfg = TrainConfig(model=str(tiny_llama), axes=["width", "heads"], widths=[32, 64], data="demo", max_steps=2,
                      batch_size=4, sampler="sandwich", calibration_batches=1,
                      output=str(tmp_path_factory.mktemp("runs") / "w"))
    return train(cfg, show_progress=False)


def test_routing_a_depth_only_checkpoint_is_refused(trained_run, tmp_path):
    with pytest.raises(ManyinoneError, match="'llama-depth' adapter has no per-layer plans"):
        export_routed(trained_run, Router(4, OPTIONS), [0.5], tmp_path / "r")


@torch.no_grad()
def test_static_plans_export_into_one_checkpoint_that_load_serves(width_run, tmp_path):
    router = Router(4, OPTIONS)
    torch.nn.init.zeros_(router.layers[0][2].weight)
    # This untrained router's plan costs about 0.6 at every budget: stored for 0.5 it would be over
    # budget (and load(budget=0.5) would then serve more than asked), so that export is refused whole.
    with pytest.raises(ManyinoneError, match=r"plan for budget 0.5 costs 0\.\d+, over its budget"):
        export_routed(width_run, router, [0.5, 1.0], tmp_path / "over")
    assert not (tmp_path / "over").exists()
    out = export_routed(width_run, router, [0.7, 1.0], tmp_path / "routed")
    index = read_index(out)
    assert [r["budget"] for r in index["routed"]] == [0.7, 1.0] and (out / "router.safetensors").is_file()
    assert all(r["relative"] <= r["budget"] for r in index["routed"])
    entry = index["routed"][0]
    sub = manyinone.load(out, budget=entry["relative"])
    plan = as_plan(entry["plan"])  # stored as (width, heads) per layer
    assert sub.manyinone_plan == plan and sub.manyinone_spec.label == "depth=4"
    nested = manyinone.open_checkpoint(out)
    ids, mask = sample_batch()
    want = nested.adapter.exit_logits(nested.adapter.forward_plan(ids, mask, plan))
    assert max_abs_diff(sub(input_ids=ids, attention_mask=mask).logits, want) <= 1e-5
    low = min(r["relative"] for r in index["routed"])
    with pytest.raises(ManyinoneError, match="below the smallest routed plan"):
        manyinone.load(out, budget=low / 2)


@torch.no_grad()
def test_input_adaptive_router_routes_each_prompt_in_the_runtime(width_run, tmp_path, char_tokenizer):
    from manyinone.elastic.router import load_router
    from manyinone.runtime.routed import RoutedRuntime

    torch.manual_seed(0)
    router = Router(4, OPTIONS, context_size=64)
    for layer in router.layers:  # let the context dominate the budget, so a wrong context picks wrong plans
        layer[0].weight[:, 1:] *= 300
    out = export_routed(width_run, router, [0.5], tmp_path / "adaptive")
    assert read_index(out)["routed"] == []  # plans are chosen per prompt, not stored
    again = load_router(out)
    assert again.adaptive and all(torch.equal(a, b) for a, b in zip(router.state_dict().values(), again.state_dict().values()))
    rt = RoutedRuntime.open(out)
    prompts = [char_tokenizer("What is 2 plus 2?")["input_ids"], char_tokenizer("Hi")["input_ids"]]
    result = rt.generate(prompts, budget=0.5, max_new_tokens=6)
    assert len(result.plans) == 2 and all(len(p) == 4 and set(p) <= set(OPTIONS) for p in result.plans)
    assert result.plans[0] != result.plans[1]  # the two prompts really route differently
    embeddings = rt.nested.model.get_input_embeddings()
    for prompt, plan, tokens in zip(prompts, result.plans, result.tokens):
        assert plan == rt.plan_for(prompt, 0.5)
        # ... and what the router itself says for this prompt's mean embedding, computed here by hand:
        assert plan == router.plan(0.5, embeddings(torch.tensor(prompt)).mean(0))
        alone = rt.adapter.extract_plan(plan).generate(input_ids=torch.tensor([prompt]), max_new_tokens=6,
                                                       do_sample=False, pad_token_id=3)[0, len(prompt):].tolist()
        assert tokens == (alone[:alone.index(2)] if 2 in alone else alone)
    with pytest.raises(ManyinoneError, match="holds no router"):
        RoutedRuntime.open(width_run)
