"""The token router: one-hot choices equal the sliced sub-network, the average-cost penalty by hand,
served greedy decoding equal to the same routing in a plain forward, adaptivity (with a planted
router that ignores its input), the checkpoint round trip and every bad input."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import manyinone
from helpers import max_abs_diff, sample_batch
from manyinone.core.errors import ManyinoneError
from manyinone.elastic.routing_math import prefix_masks
from manyinone.elastic.token_router import (CostParts, TokenRouter, TokenRouterTraining, average_cost, cost_parts,
                                            is_token_adaptive, routed_forward, token_costs, token_width_probs,
                                            train_token_router, width_distribution)
from manyinone.elastic.token_router_io import load_token_router
from manyinone.train.data import collate, load_records, tokenize_records
from manyinone_flextron import LlamaFlextronAdapter

WIDTHS, HEADS = [32, 64, 128], [2, 4]  # tiny model: MLP 128, 4 heads in 2 KV groups


@pytest.fixture
def adapter(tiny_llama):
    return LlamaFlextronAdapter(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval())


def planted_router(widths=WIDTHS, heads=HEADS, plans=((0, 0, 0, 0), (1, 2, 0, 2)), head=(1, 0, 1, 1),
                   scale=40.0, seed=0) -> TokenRouter:
    """A 4-layer router whose plans are set by hand (width index per layer, heads index per layer) and
    whose selector reads the token's embedding strongly (random weights, scaled)."""
    torch.manual_seed(seed)
    router = TokenRouter(4, widths, heads, embed_size=64, num_plans=len(plans))
    K, L, W, H = len(plans), 4, len(widths), len(heads)
    bias = torch.zeros(K * L * W + L * H)
    for k, plan in enumerate(plans):
        for i, w in enumerate(plan):
            bias[(k * L + i) * W + w] = 10.0
    for i, h in enumerate(head):
        bias[K * L * W + i * H + h] = 10.0
    with torch.no_grad():
        router.plan_net[2].weight.zero_()
        router.plan_net[2].bias.copy_(bias)
        router.selector[2].weight.mul_(scale)
    return router.eval()


class IgnoringRouter(TokenRouter):
    """The planted bug: a selector that never looks at the token (it sees zeros instead)."""

    def select_logits(self, budget, embeds):
        return super().select_logits(budget, torch.zeros_like(embeds))


@torch.no_grad()
def test_one_hot_choices_compute_exactly_the_sliced_plan(adapter):
    ids, mask = sample_batch()
    batch, seq = ids.shape
    plans = [((32, 4), (64, 4), (128, 4), (32, 4)), ((64, 4), (32, 4), (32, 4), (128, 4))]
    one_hot_plans = torch.zeros(batch, 2, 4, len(WIDTHS))  # [batch, K, layers, W]
    for k, plan in enumerate(plans):
        for i, (w, _) in enumerate(plan):
            one_hot_plans[:, k, i, WIDTHS.index(w)] = 1
    full = ((128, 4),) * 4
    for k, plan in enumerate(plans):
        select = torch.zeros(batch, seq, 2)
        select[..., k] = 1  # every token on plan k
        neurons = prefix_masks(token_width_probs(select, one_hot_plans), torch.tensor(WIDTHS), 128)
        assert neurons.shape == (batch, seq, 4, 128)
        with adapter.masked({"width": neurons}):
            masked = adapter.exit_logits(adapter.forward_plan(ids, mask, full))
        sliced = adapter.exit_logits(adapter.forward_plan(ids, mask, plan))
        assert max_abs_diff(masked, sliced, mask) <= 1e-5
    assert max_abs_diff(sliced, adapter.exit_logits(adapter.forward_plan(ids, mask, full)), mask) > 1e-3


def test_average_cost_is_the_penalty_expectation_by_hand():
    parts = CostParts(width_table=torch.tensor([[0.10, 0.20], [0.15, 0.25]]),  # [layers 2, widths 2]
                      heads_table=torch.tensor([[0.05, 0.10], [0.05, 0.10]]), fixed=0.1)
    select = torch.tensor([[[0.25, 0.75], [1.0, 0.0]]])  # [batch 1, seq 2, plans 2]
    plan_w = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]],  # plan 0: the narrow width in both layers
                            [[0.0, 1.0], [0.5, 0.5]]]])  # plan 1: wide, then a coin flip; [1, 2, 2, 2]
    heads = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])  # [1, layers, H]: all heads in both layers
    per_token = token_costs(token_width_probs(select, plan_w), heads, parts)  # [1, 2]
    # Enumerate every hard outcome: plan k, then each layer's width, with its probability.
    fixed_rest = 0.1 + 0.10 + 0.10
    plan0 = 0.10 + 0.15
    plan1 = 0.20 + (0.5 * 0.15 + 0.5 * 0.25)
    want = [0.25 * plan0 + 0.75 * plan1 + fixed_rest, plan0 + fixed_rest]
    assert per_token[0].tolist() == pytest.approx(want)
    keep = torch.tensor([[1, 1]])
    assert average_cost(per_token, keep).item() == pytest.approx(sum(want) / 2)
    assert average_cost(per_token, torch.tensor([[0, 1]])).item() == pytest.approx(want[1])  # pads do not count


def test_cost_parts_add_up_to_the_adapters_exact_plan_cost(adapter):
    parts = cost_parts(adapter, WIDTHS, HEADS)
    full = adapter.plan_cost(((128, 4),) * 4).flops_per_token
    for plan in [((128, 4),) * 4, ((32, 2), (64, 4), (128, 2), (32, 4))]:
        want = adapter.plan_cost(plan).flops_per_token / full
        assert parts.plan_cost(plan, WIDTHS, HEADS) == pytest.approx(want, rel=1e-6)


def test_the_routed_tokens_average_equals_their_plans_costs(adapter):
    router = planted_router()
    routing = router.routing(0.5, adapter.model.get_input_embeddings().weight)
    parts = cost_parts(adapter, WIDTHS, HEADS)
    routing.priced(lambda p: parts.plan_cost(p, WIDTHS, HEADS))
    ids, _ = sample_batch()
    index = routing.table[ids]  # [batch, seq]
    by_hand = sum(parts.plan_cost(routing.plans[k], WIDTHS, HEADS) for k in index.flatten().tolist()) / index.numel()
    assert routing.average(index) == pytest.approx(by_hand)
    assert 0 < routing.average(index) < 1
    # ... and the penalty's cost of the same hard choices is that number too.
    select = torch.nn.functional.one_hot(index, 2).float()  # [batch, seq, K]
    plan_w = torch.zeros(1, 2, 4, len(WIDTHS))
    for k, plan in enumerate(routing.plans):
        for i, o in enumerate(plan):
            plan_w[0, k, i, WIDTHS.index(o["width"])] = 1
    heads = torch.zeros(1, 4, len(HEADS))
    for i, o in enumerate(routing.plans[0]):
        heads[0, i, HEADS.index(o["heads"])] = 1
    probs = token_width_probs(select, plan_w.expand(index.shape[0], -1, -1, -1))
    per_token = token_costs(probs, heads.expand(index.shape[0], -1, -1), parts)
    assert per_token.mean().item() == pytest.approx(by_hand, rel=1e-5)


def test_a_router_that_ignores_its_input_fails_the_adaptivity_check(adapter):
    embedding = adapter.model.get_input_embeddings().weight
    tokens = torch.arange(embedding.shape[0])
    good = planted_router().routing(0.5, embedding)
    assert is_token_adaptive(good, good.table[tokens])
    dist = width_distribution(good, good.table[tokens])
    assert len(dist) == 4 and sum(len(layer) > 1 for layer in dist) >= 2
    ignoring = IgnoringRouter(4, WIDTHS, HEADS, embed_size=64, num_plans=2)
    ignoring.load_state_dict(planted_router().state_dict())  # the same weights, the bug only
    bad = ignoring.routing(0.5, embedding)
    assert bad.plans == good.plans and not is_token_adaptive(bad, bad.table[tokens])
    # Two plans with identical widths are not adaptivity either.
    same = planted_router(plans=((1, 1, 1, 1), (1, 1, 1, 1))).routing(0.5, embedding)
    assert not is_token_adaptive(same, same.table[tokens])


def demo_batches(tokenizer, n=3):
    examples = tokenize_records(load_records("demo", None), tokenizer, 256, "alpaca")
    return [collate(examples[i * 4:(i + 1) * 4], tokenizer.pad_token_id) for i in range(n)]


def test_training_moves_the_average_cost_towards_the_budget(adapter, char_tokenizer):
    torch.manual_seed(0)
    router = TokenRouter(4, WIDTHS, HEADS, embed_size=64, num_plans=3)
    parts = cost_parts(adapter, WIDTHS, HEADS)
    weights = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    log = train_token_router(router, adapter, demo_batches(char_tokenizer), parts,
                             TokenRouterTraining(budgets=[0.4], steps=30, lr=0.05, cost_weight=50.0))
    assert len(log) == 30 and all(math.isfinite(r["loss"]) for r in log)
    assert abs(log[-1]["cost_gap"]) < abs(log[0]["cost_gap"])
    assert all(torch.equal(weights[k], v) for k, v in adapter.model.state_dict().items())  # frozen
    joint = train_token_router(router, adapter, demo_batches(char_tokenizer, 1), parts,
                               TokenRouterTraining(budgets=[0.4], steps=2, model_lr=1e-3))
    assert len(joint) == 2 and any(not torch.equal(weights[k], v) for k, v in adapter.model.state_dict().items())


# --- a token-routed checkpoint ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def width_run(tiny_llama, tmp_path_factory):
    from manyinone.train.config import TrainConfig
    from manyinone.train.loop import train

    cfg = TrainConfig(model=str(tiny_llama), axes=["width", "heads"], widths=WIDTHS, data="demo", max_steps=2,
                      batch_size=4, sampler="sandwich", calibration_batches=1,
                      output=str(tmp_path_factory.mktemp("runs") / "w"))
    return train(cfg, show_progress=False)


@pytest.fixture(scope="module")
def token_run(width_run, tmp_path_factory, char_tokenizer_module):
    from manyinone.elastic.route import export_token_routed

    nested = manyinone.open_checkpoint(width_run)
    parts = cost_parts(nested.adapter, WIDTHS, HEADS)
    out = tmp_path_factory.mktemp("routed") / "token"
    return export_token_routed(nested, planted_router(), {1.0: 0.5}, out, demo_batches(char_tokenizer_module), parts)


@pytest.fixture(scope="module")
def char_tokenizer_module(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def reference_greedy(nested, routing, prompt: list[int], new: int) -> list[int]:
    """Greedy decoding with no cache: every step runs the whole sequence through the routed forward."""
    seq = torch.tensor([prompt])
    out = []
    for _ in range(new):
        hidden = routed_forward(nested.adapter, routing, seq, torch.ones_like(seq))  # [1, seq, hidden]
        token = int(nested.adapter.exit_logits(hidden[:, -1]).argmax(-1))
        out.append(token)
        seq = torch.cat([seq, torch.tensor([[token]])], dim=1)
    return out


@torch.no_grad()
def test_served_token_routing_equals_the_plain_routed_forward(token_run, char_tokenizer_module):
    from manyinone.runtime import Runtime

    nested = manyinone.open_checkpoint(token_run)
    entry = nested.index["token_routed"][0]
    routing = nested.token_routing(entry["average"])
    assert routing is not None and len(routing.plans) == 2
    rt = Runtime.open(token_run, device="cpu")
    prompts = [char_tokenizer_module("What is 2 plus 2?")["input_ids"], char_tokenizer_module("Hi there")["input_ids"]]
    out = rt.generate(prompts, budget=entry["average"], max_new_tokens=10, stop_ids=set())
    assert out.stats["token_routed"] and out.stats["mixed_steps"] > 0  # rows really ran different plans at once
    assert all(c > 0 for c in out.stats["plan_counts"])
    for prompt, tokens in zip(prompts, out.tokens):
        assert tokens == reference_greedy(nested, routing, prompt, 10)
        alone = rt.generate([prompt], budget=entry["average"], max_new_tokens=10, stop_ids=set())
        assert alone.tokens[0] == tokens and alone.stats["mixed_steps"] == 0
    # manyinone.load gives a plain transformers model routing the same way (generate, KV cache and all).
    model = manyinone.load(token_run, budget=entry["average"])
    ids = torch.tensor([prompts[0]])
    gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, min_new_tokens=10,
                         do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert gen == out.tokens[0]


def test_the_checkpoint_records_what_each_budget_routes(token_run):
    from manyinone.io.checkpoint import read_index
    from manyinone.io.integrity import CHECKSUMS_FILE
    import json

    index = read_index(token_run)
    entry = index["token_routed"][0]
    assert entry["budget"] == 0.5 and len(entry["plans"]) == 2 and sum(entry["usage"]) == pytest.approx(1.0)
    assert 0 < entry["average"] <= 1.0 and index["token_router"]["num_plans"] == 2
    listed = json.loads((token_run / CHECKSUMS_FILE).read_text())
    assert {"token_router.safetensors", "token_router.json"} <= set(listed)  # covered by the checksums


def test_bad_inputs_get_one_line_errors(token_run, trained_run, tmp_path, adapter):
    from manyinone.elastic.route import route_checkpoint
    from manyinone.io.export import export_budget
    from manyinone.runtime import Runtime

    nested = manyinone.open_checkpoint(token_run)
    low = nested.index["token_routed"][0]["average"]
    with pytest.raises(ManyinoneError, match="below the cheapest token-routed budget"):
        manyinone.load(token_run, budget=low / 2)
    with pytest.raises(ManyinoneError, match="below the cheapest token-routed budget"):
        Runtime.open(token_run, device="cpu").generate([[1, 5, 6]], budget=low / 2, max_new_tokens=2)
    with pytest.raises(ManyinoneError, match="is token-routed .* a plain HF model holds one plan"):
        export_budget(token_run, 1.0, tmp_path / "export")
    assert not (tmp_path / "export").exists()
    with pytest.raises(ManyinoneError, match="does not match the checkpoint's index: num_plans"):
        load_token_router(token_run, nested.adapter, {**nested.index["token_router"], "num_plans": 3})
    shallow = LlamaFlextronAdapter(nested.adapter.extract_plan(((128, 4),) * 3))
    with pytest.raises(ManyinoneError, match="does not match the checkpoint: 4 layers, the model has 3"):
        load_token_router(token_run, shallow)
    from manyinone.elastic.route import export_token_routed

    parts = cost_parts(nested.adapter, WIDTHS, HEADS)
    wrong = TokenRouter(4, WIDTHS, [2, 3], embed_size=64, num_plans=2)
    with pytest.raises(ManyinoneError, match=r"does not match the checkpoint: heads \[3\] not multiples of 2"):
        export_token_routed(nested, wrong, {1.0: 0.5}, tmp_path / "wrong", [], parts)
    assert not (tmp_path / "wrong").exists()
    with pytest.raises(ManyinoneError, match="token routing needs a checkpoint trained with elastic width"):
        route_checkpoint(trained_run, tmp_path / "r", "token", [0.5], data="demo")
    with pytest.raises(ManyinoneError, match="route mode 'perlayer' unknown"):
        route_checkpoint(token_run, tmp_path / "r", "perlayer", [0.5], data="demo")


@torch.no_grad()
def test_the_server_decodes_a_token_routed_budget_per_token(token_run):
    pytest.importorskip("fastapi")
    from manyinone.runtime import Runtime
    from manyinone.runtime.server import CompletionRequest, Engine

    rt = Runtime.open(token_run, device="cpu")
    budget = rt.index["token_routed"][0]["average"]
    engine = Engine(rt, "alpaca", default_max_tokens=8, batch_rows=4)  # the shared batch is on...
    job = engine.check(CompletionRequest(prompt="Hello there", temperature=0.0, budget=budget), ["Hello there"], 8)
    assert not engine.batched(job)  # ... but a token-routed budget changes plans per step: it decodes alone
    texts, _, info = engine.complete(job)
    want = rt.generate([rt.encode("Hello there")], budget=budget, max_new_tokens=8)
    assert info["token_routed"] and texts[0] == rt.decode(want.tokens[0])
    with pytest.raises(ManyinoneError, match="speculative decoding serves depth budgets only"):
        engine.check(CompletionRequest(prompt="Hi", budget=budget, speculative=True), ["Hi"], 4)


@torch.no_grad()
def test_a_compiled_step_routes_the_same_tokens(token_run, char_tokenizer_module):
    from manyinone.io.api import open_checkpoint
    from manyinone.runtime import Runtime
    from manyinone.runtime.stack import compile_step

    nested = open_checkpoint(token_run)
    budget = nested.index["token_routed"][0]["average"]
    plain = Runtime.from_nested(nested)
    calls = []

    def counted(fn):  # compile_step, counting the calls that reach a compiled step
        step = compile_step(fn, "aot_eager")
        return lambda *args: (calls.append(1), step(*args))[1]

    compiled = Runtime.from_nested(nested, compile_fn=counted)
    prompts = [char_tokenizer_module(t)["input_ids"] for t in ("What is 2 plus 2?", "Hi there")]
    mixed = []
    for batch in ([prompts[0]], prompts):  # one plan per step; then rows on different plans (mixed steps)
        want = plain.generate(batch, budget=budget, max_new_tokens=6, stop_ids=set())
        calls.clear()
        got = compiled.generate(batch, budget=budget, max_new_tokens=6, stop_ids=set())
        assert got.tokens == want.tokens and got.stats["plan_counts"] == want.stats["plan_counts"]
        assert got.stats["mixed_steps"] == want.stats["mixed_steps"]
        assert len(calls) == got.stats["steps"] - 1  # every decode step after prefill ran compiled, mixed ones too
        mixed.append(got.stats["mixed_steps"])
    assert mixed[0] == 0 and mixed[1] > 0  # the pair really ran rows on different plans at once
    # Without fused forwards a mixed step runs eagerly through the mask hooks: same tokens, and it is
    # not counted as a compiled variant.
    unfused = Runtime.from_nested(nested, compile_fn=counted)
    unfused.stack.fused = None
    calls.clear()
    assert unfused.generate(prompts, budget=budget, max_new_tokens=6, stop_ids=set()).tokens == want.tokens
    assert len(calls) == got.stats["steps"] - 1 - got.stats["mixed_steps"]
    admitted = [shape for shapes in unfused.runner(2).shapes.values() for shape in shapes]
    assert admitted and all(mask is None for *_, mask in admitted)
