"""The runtime serves every axis from one copy of the weights: width/heads plans as sliced views equal
the exported plain model token for token (every architecture), through an index and a checkpoint; and
decoder layers get their cache under the keyword this transformers release takes (no deprecation)."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from manyinone.core.errors import ManyinoneError
from manyinone.core.space import SubnetSpec
from manyinone.io.checkpoint import build_index, resolve, save_checkpoint
from manyinone.runtime import Runtime
from manyinone.runtime.cache import live_length
from manyinone.runtime.stack import cache_argument, compile_step
from manyinone.core.axes import as_plan
from manyinone_flextron import LlamaFlextronAdapter
from test_runtime import hf_greedy, random_prompts

# tiny models: 4 layers, MLP 128, 4 heads sharing 2 KV heads (groups of 2)
SPECS = [SubnetSpec(depth=4, width=64, heads=4), SubnetSpec(depth=4, width=128, heads=2),
         SubnetSpec(depth=3, width=32, heads=2), SubnetSpec(depth=2, width=128, heads=4)]


def load(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@torch.no_grad()
def test_every_axis_equals_the_exported_model(any_tiny_model):
    """Each (depth, width, heads) spec run as views inside the runtime == HF greedy of the extracted model;
    the prompts + answers run past the sliding window of 8 (mistral, qwen2)."""
    model = load(any_tiny_model)
    adapter = LlamaFlextronAdapter(model)
    rt = Runtime(model, adapter=adapter, max_len=96)
    prompts = random_prompts(2, seed=11)
    for spec in SPECS:
        sub = adapter.extract(spec).eval()
        for prompt in prompts:
            got = rt.generate([prompt], spec=spec, max_new_tokens=16, stop_ids=set())
            assert got.tokens[0] == hf_greedy(sub, prompt, 16), (spec, prompt)
            assert got.depth == spec["depth"]
    # The weights are whole again afterwards and the full model is unchanged.
    assert all(isinstance(p, torch.nn.Parameter) for p in model.parameters())
    prompt = prompts[0]
    assert rt.generate([prompt], max_new_tokens=16, stop_ids=set()).tokens[0] == hf_greedy(model, prompt, 16)


@torch.no_grad()
def test_batched_width_rows_equal_single_rows(tiny_qwen2):
    model = load(tiny_qwen2)
    rt = Runtime(model, adapter=LlamaFlextronAdapter(model), max_len=96)
    spec = SubnetSpec(depth=3, width=64, heads=2)
    prompts = random_prompts(3, seed=12)
    batched = rt.generate(prompts, spec=spec, max_new_tokens=12, stop_ids=set()).tokens
    assert batched == [rt.generate([p], spec=spec, max_new_tokens=12, stop_ids=set()).tokens[0] for p in prompts]


@torch.no_grad()
def test_width_budget_through_a_checkpoint_equals_the_exported_width_model(tiny_llama, char_tokenizer, tmp_path):
    model = load(tiny_llama)
    adapter = LlamaFlextronAdapter(model)
    space = adapter.space({"depth": [2, 4], "width": [64, 128], "heads": [2, 4]})
    folder = save_checkpoint(model, char_tokenizer, build_index(adapter, space), tmp_path / "ckpt")
    rt = Runtime.open(folder, device="cpu", max_len=96)
    spec = resolve(rt.index, 0.5)
    assert spec["width"] < 128 or spec["heads"] < 4  # the budget really slices width or heads
    depth, plan = rt.target(0.5)
    assert depth == spec["depth"] and plan == (SubnetSpec(width=spec["width"], heads=spec["heads"]),) * depth
    sub = adapter.extract(spec).eval()
    for prompt in random_prompts(2, seed=13):
        assert rt.generate([prompt], budget=0.5, max_new_tokens=16, stop_ids=set()).tokens[0] == hf_greedy(sub, prompt, 16)
    with pytest.raises(ManyinoneError, match="speculative decoding serves depth budgets"):
        rt.generate([[5, 6, 7]], budget=0.5, speculative=True)


def test_bad_specs_name_the_value(tiny_llama):
    model = load(tiny_llama)
    rt = Runtime(model, adapter=LlamaFlextronAdapter(model), max_len=32)
    with pytest.raises(ManyinoneError, match="heads=3 out of range"):
        rt.generate([[5, 6]], spec={"heads": 3})
    with pytest.raises(ManyinoneError, match="depth=9 out of range"):
        rt.generate([[5, 6]], spec={"depth": 9})
    with pytest.raises(ManyinoneError, match=r"spec axes \['experts'\] unknown"):
        rt.generate([[5, 6]], spec={"experts": 2})
    plain = Runtime(model, max_len=32)  # the depth adapter: no plans
    with pytest.raises(ManyinoneError, match="serves depth only"):
        plain.generate([[5, 6]], spec={"width": 64})


def test_live_length_rounds_up_to_the_bucket_and_stops_at_the_cache():
    assert [live_length(n, 1024, 256) for n in (1, 256, 257, 1000, 1024)] == [256, 256, 512, 1024, 1024]
    assert live_length(40, 96, 256) == 96


@torch.no_grad()
def test_live_buckets_give_the_same_tokens_as_the_whole_cache(tiny_mistral, monkeypatch):
    """Attention over a bucket of the cache (8 slots here) == over the whole buffer, across bucket edges."""
    import manyinone.runtime.stack as stack

    model = load(tiny_mistral)
    prompt = random_prompts(1, seed=14)[0]
    whole = Runtime(model, max_len=96).generate([prompt], max_new_tokens=30, stop_ids=set()).tokens
    monkeypatch.setattr(stack, "live_length", lambda n, max_len: live_length(n, max_len, 8))
    bucketed = Runtime(model, max_len=96)
    seen = []
    real = bucketed.stack.run
    monkeypatch.setattr(bucketed.stack, "run", lambda *a, **k: seen.append(k.get("live")) or real(*a, **k))
    assert bucketed.generate([prompt], max_new_tokens=30, stop_ids=set()).tokens == whole
    assert len(set(seen)) > 2 and max(seen) < 96  # several buckets, none the whole cache


@pytest.mark.filterwarnings("error::FutureWarning")
@torch.no_grad()
def test_layers_get_their_cache_without_a_deprecation_warning(tiny_llama):
    """Fails if the runtime passes a deprecated keyword (transformers 5.2x deprecates past_key_values)."""
    model = load(tiny_llama)
    rt = Runtime(model, max_len=32)
    rt.generate([[5, 6, 7]], max_new_tokens=4, stop_ids=set())
    if rt.stack.cache_arg == "cache":  # this release renamed it: the old name must warn (the guard is live)
        rt.stack.cache_arg = "past_key_values"
        with pytest.warns(FutureWarning, match="past_key_values"):
            rt.generate([[5, 6, 7]], max_new_tokens=4, stop_ids=set())
    assert cache_argument(model.model.layers[0]) in ("cache", "past_key_values")


def whole_graph(fn):
    """torch.compile without code generation, refusing any graph break: the whole step must trace as one graph."""
    return torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=False)


@torch.no_grad()
@pytest.mark.parametrize("kind", ["tiny_llama", "tiny_mistral"])
def test_the_fused_step_traces_whole_and_equals_eager(kind, request):
    """The compiled decode step (embed, every layer, head; a width plan too) is one graph, same tokens."""
    model = load(request.getfixturevalue(kind))
    eager = Runtime(model, adapter=LlamaFlextronAdapter(model), max_len=64)
    fused = Runtime(model, adapter=LlamaFlextronAdapter(model), max_len=64, compile_fn=whole_graph)
    assert fused.fused and not eager.fused
    prompt = random_prompts(1, seed=15)[0]
    for spec in (None, SubnetSpec(depth=3, width=64, heads=2)):
        want = eager.generate([prompt], spec=spec, max_new_tokens=10, stop_ids=set()).tokens
        assert fused.generate([prompt], spec=spec, max_new_tokens=10, stop_ids=set()).tokens == want
    # What Runtime(fused=True) uses, both attention choices (traced, not code-generated, on CPU).
    for math in (True, False):
        step = Runtime(model, max_len=64, compile_fn=lambda fn: compile_step(fn, "aot_eager", math))
        assert step.generate([prompt], max_new_tokens=10, stop_ids=set()).tokens == \
            eager.generate([prompt], max_new_tokens=10, stop_ids=set()).tokens


@torch.no_grad()
def test_a_stored_routed_plan_runs_as_views_and_equals_its_extracted_model(tiny_qwen2):
    """A static router's per-layer plan (mixed widths and heads per layer) in the index: the budget runs it."""
    model = load(tiny_qwen2)
    adapter = LlamaFlextronAdapter(model)
    index = build_index(adapter, adapter.space({"depth": [4], "width": [64, 128], "heads": [2, 4]}))
    pairs = ((128, 2), (32, 4), (64, 2), (128, 4))  # (width, heads): the index's stored form
    plan = as_plan(pairs)
    relative = adapter.plan_cost(plan).flops_per_token / adapter.cost(SubnetSpec()).flops_per_token
    index["routed"] = [{"budget": 0.7, "plan": [list(o) for o in pairs], "relative": relative}]
    rt = Runtime(model, index=index, adapter=adapter, max_len=96)
    assert rt.target(0.9) == (4, plan)
    sub = adapter.extract_plan(plan).eval()
    for prompt in random_prompts(2, seed=16):
        assert rt.generate([prompt], budget=0.9, max_new_tokens=12, stop_ids=set()).tokens[0] == hf_greedy(sub, prompt, 12)
