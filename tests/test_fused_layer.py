"""The fused decode forward of LLaMA-layout layers (`manyinone_llama.fused`): one GEMM for q/k/v and
one for gate/up over buffers the HF parameters are views of. The compiled step (traced with
aot_eager on CPU) runs it: greedy tokens equal full forwards without a cache on every architecture
(GQA, qwen2 biases, sliding windows past the window of 8, tied and untied heads) and on a width/heads
plan equal its exported model; one step's logits equal the eager HF layers; the parameters keep
their values and objects and share storage with the buffers (no second copy)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from manyinone.core.axes import as_plan
from manyinone.core.space import SubnetSpec
from manyinone.io.checkpoint import build_index
from manyinone.runtime import Runtime
from manyinone.runtime.cache import left_pad
from manyinone.runtime.stack import compile_step
from manyinone.testing import greedy_without_cache
from manyinone_flextron import LlamaFlextronAdapter
from manyinone_llama.fused import QKV, GATE_UP, FusedDecoderLayer
from test_runtime import random_prompts

PLAN = SubnetSpec(depth=3, width=64, heads=2)  # tiny models: MLP 128, 4 heads sharing 2 KV heads


def load(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def traced(fn):
    return compile_step(fn, "aot_eager")  # what Runtime(fused=True) compiles, without code generation


def fused_runtime(model, adapter=None, **kwargs) -> Runtime:
    rt = Runtime(model, adapter=adapter, max_len=96, compile_fn=traced, **kwargs)
    assert rt.stack.fused is not None and all(isinstance(f, FusedDecoderLayer) for f in rt.stack.fused)
    return rt


def long_prompts(count: int, seed: int) -> list[list[int]]:
    return random_prompts(count, seed=seed, low=10, high=24)  # past the sliding window of 8 (mistral, qwen2)


@torch.no_grad()
def test_fused_greedy_equals_full_forwards_on_every_architecture(any_tiny_model):
    model = load(any_tiny_model)
    rt = fused_runtime(model)
    for prompt in long_prompts(2, seed=21):
        want = greedy_without_cache(model, prompt, 16)
        assert rt.generate([prompt], max_new_tokens=16, stop_ids=set()).tokens[0] == want, prompt
    batch = long_prompts(3, seed=22)  # left-padded rows in one fused step
    assert rt.generate(batch, max_new_tokens=8, stop_ids=set()).tokens == \
        [greedy_without_cache(model, p, 8) for p in batch]


@torch.no_grad()
@pytest.mark.parametrize("kind", ["tiny_qwen2", "tiny_llama_tied"])
def test_a_fused_width_heads_plan_equals_its_exported_model(kind, request):
    """A plan slices every fused section (q rows of kept heads, k/v rows of kept groups, gate and up rows
    of kept neurons); the plan's tokens equal the exported model's, the full model's after it too."""
    model = load(request.getfixturevalue(kind))
    adapter = LlamaFlextronAdapter(model)
    rt = fused_runtime(model, adapter)
    sub = adapter.extract(PLAN).eval()
    for prompt in long_prompts(2, seed=23):
        got = rt.generate([prompt], spec=PLAN, max_new_tokens=12, stop_ids=set()).tokens[0]
        assert got == greedy_without_cache(sub, prompt, 12), prompt
    # A per-layer plan (mixed widths and heads per layer, a stored routed plan) through the same buffers.
    pairs = ((128, 2), (32, 4), (64, 2), (128, 4))  # (width, heads) per layer
    index = build_index(adapter, adapter.space({"depth": [4], "width": [64, 128], "heads": [2, 4]}))
    index["routed"] = [{"budget": 0.7, "plan": [list(o) for o in pairs], "relative": 0.7}]
    routed = fused_runtime(model, adapter, index=index)
    sub = adapter.extract_plan(as_plan(pairs)).eval()
    prompt = long_prompts(1, seed=24)[0]
    assert routed.generate([prompt], budget=0.9, max_new_tokens=8, stop_ids=set()).tokens[0] == \
        greedy_without_cache(sub, prompt, 8)
    assert rt.generate([prompt], max_new_tokens=8, stop_ids=set()).tokens[0] == greedy_without_cache(model, prompt, 8)


@torch.no_grad()
@pytest.mark.parametrize("plan", [None, PLAN])
def test_one_fused_step_equals_the_eager_layers(tiny_qwen2, plan):
    model = load(tiny_qwen2)
    adapter = LlamaFlextronAdapter(model)
    eager, fused = Runtime(model, adapter=adapter, max_len=96), fused_runtime(model, adapter)
    depth, layer_plan = fused.target(spec=plan)
    prompt = long_prompts(1, seed=25)[0]
    ids, pad = torch.tensor([prompt]), torch.zeros(1, dtype=torch.long)
    logits = []
    for rt in (eager, fused):
        run = rt.runner(1)
        first = run.prefill(depth, ids, pad, layer_plan).argmax(-1)  # [1, 1]
        _, out = run(0, depth, first, rt._slots[len(prompt): len(prompt) + 1], pad, slots_end=len(prompt) + 1,
                     plan=layer_plan)
        logits.append(out)
    assert logits[0].shape == logits[1].shape
    assert (logits[0] - logits[1]).abs().max().item() <= 1e-4


@torch.no_grad()
@pytest.mark.parametrize("plan", [None, PLAN])
def test_one_masked_fused_step_equals_the_hooked_eager_layers(tiny_qwen2, plan):
    """Per-row MLP-neuron masks (the token router's mixed steps): the fused forwards take them as an
    argument, the eager layers through the adapter's mask hooks; one batched step agrees row by row."""
    model = load(tiny_qwen2)
    adapter = LlamaFlextronAdapter(model)
    eager, fused = Runtime(model, adapter=adapter, max_len=96), fused_runtime(model, adapter)
    depth, layer_plan = fused.target(spec=plan)
    prompts = long_prompts(2, seed=27)
    total = model.config.intermediate_size
    keep = torch.tensor([[48], [16]])  # row 0 keeps 48 neurons of every layer, row 1 keeps 16
    masks = (torch.arange(total) < keep).float()[:, None, None, :].expand(2, 1, model.config.num_hidden_layers, total)
    apply = lambda m: adapter.masked({"width": m})  # noqa: E731
    ids, pad = left_pad(prompts, 0, torch.device("cpu"))
    width = ids.shape[1]
    logits = []
    for rt in (eager, fused):
        run = rt.runner(2)
        first = run.prefill(depth, ids, pad, layer_plan).argmax(-1)  # [2, 1]
        _, out = run(0, depth, first, rt._slots[width: width + 1], pad, slots_end=width + 1, plan=layer_plan,
                     masked=(apply, masks))
        logits.append(out)
    assert (logits[0] - logits[1]).abs().max().item() <= 1e-4
    _, unmasked = fused.runner(2)(0, depth, first, fused._slots[width: width + 1], pad, slots_end=width + 1,
                                  plan=layer_plan)
    assert (unmasked - logits[1]).abs().max().item() > 1e-3  # the masks changed the step


def storage_bytes(model) -> int:
    """Bytes of the distinct storages behind the model's parameters."""
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    return sum(storages.values())


@torch.no_grad()
def test_fusing_keeps_values_and_parameters_and_shares_storage(tiny_qwen2):
    model = load(tiny_qwen2)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    objects = {name: p for name, p in model.named_parameters()}
    bytes_before = storage_bytes(model)
    rt = fused_runtime(model)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    assert all(after[n] is objects[n] for n in after)  # the same Parameter objects (optimizers, hooks keep them)
    assert all(torch.equal(after[n], before[n]) for n in after)  # bit-identical values
    assert storage_bytes(model) <= bytes_before  # no second copy of any weight
    for layer, fused in zip(model.model.layers, rt.stack.fused):
        for module, names, buffers in ((layer.self_attn, QKV, (fused.qkv_weight, fused.qkv_bias)),
                                       (layer.mlp, GATE_UP, (fused.gate_up_weight, fused.gate_up_bias))):
            for leaf, buffer in zip(("weight", "bias"), buffers):
                params = [getattr(getattr(module, n), leaf) for n in names]
                if buffer is None:  # qwen2 has q/k/v biases, no MLP biases
                    assert all(p is None for p in params)
                    continue
                # Each parameter is the next rows of the buffer, in order, and nothing else.
                start, step = buffer.data_ptr(), buffer.element_size()
                offset = 0
                for p in params:
                    assert p.data_ptr() == start + offset * step
                    assert p.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
                    offset += p.numel()
                assert offset == buffer.numel()
        assert fused.qkv_bias is not None  # qwen2's q/k/v biases are fused too
    # A second fused runtime on the same model reuses the buffers (re-homing would leave the first stale).
    again = fused_runtime(model)
    assert all(a is b for a, b in zip(again.stack.fused, rt.stack.fused))
    prompt = long_prompts(1, seed=26)[0]
    assert rt.generate([prompt], max_new_tokens=6, stop_ids=set()).tokens == \
        again.generate([prompt], max_new_tokens=6, stop_ids=set()).tokens


@torch.no_grad()
def test_a_fused_model_saves_and_restore_gives_each_parameter_its_storage_back(tiny_llama, tmp_path):
    from safetensors.torch import save_file

    from manyinone.core.errors import ManyinoneError

    model = load(tiny_llama)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    rt = fused_runtime(model)
    q = model.model.layers[0].self_attn.q_proj.weight
    k = model.model.layers[0].self_attn.k_proj.weight
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
    model.save_pretrained(tmp_path / "hf")  # transformers' own save takes the views as they are
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert all(torch.equal(p, before[n]) for n, p in again.named_parameters())
    rt.stack.fused.restore()
    assert q.untyped_storage().data_ptr() != k.untyped_storage().data_ptr()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    state = {n: p.detach() for n, p in model.named_parameters() if n != "lm_head.weight" or not
             model.config.tie_word_embeddings}
    save_file(state, tmp_path / "w.safetensors")  # refuses tensors sharing storage: none do now
    with pytest.raises(ManyinoneError, match="moved or reloaded"):
        rt.generate([[5, 6, 7]], max_new_tokens=3, stop_ids=set())


@torch.no_grad()
def test_a_multi_head_plan_runs_q_k_v_as_one_batched_gemm_and_equals_its_exported_model(monkeypatch):
    """Multi-head attention (the LLaMA-2-7B layout: as many KV heads as query heads): under a heads plan
    the three equal q/k/v sections go through one batched GEMM, and the tokens still equal the export."""
    from helpers import tiny_config

    config = tiny_config("llama")
    config.num_key_value_heads = config.num_attention_heads
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    adapter = LlamaFlextronAdapter(model)
    sections = []
    plain = FusedDecoderLayer._sections

    def counted(x, weight, bias, rows, keep):
        sections.append((weight.shape[0] // rows, rows))
        return plain(x, weight, bias, rows, keep)

    monkeypatch.setattr(FusedDecoderLayer, "_sections", staticmethod(counted))
    rt = fused_runtime(model, adapter)
    sub = adapter.extract(PLAN).eval()
    for prompt in long_prompts(2, seed=27):
        assert rt.generate([prompt], spec=PLAN, max_new_tokens=10, stop_ids=set()).tokens[0] == \
            greedy_without_cache(sub, prompt, 10), prompt
    kv_rows = model.model.layers[0].self_attn.k_proj.out_features
    assert (3, kv_rows) in sections and (2, kv_rows) not in sections  # q/k/v at once, never k/v apart from q
