"""CUDA: the fused decode step (whole step compiled by torch.compile, recorded as a CUDA graph) equals the
eager step: logits within a stated tolerance, greedy tokens equal to eager and to greedy full forwards of the HF model (no cache) in float32, a
width plan equal to its exported model, and 128 greedy steps equal on the real model (SmolLM2 at
/root/smollm2-hf, skipped when absent). Skipped without CUDA."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from manyinone.core.space import SubnetSpec
from manyinone.runtime import Runtime
from manyinone_flextron import LlamaFlextronAdapter
from manyinone.testing import greedy_without_cache

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
REAL_MODEL = os.environ.get("MANYINONE_REAL_MODEL", "/root/smollm2-hf")
LOGIT_TOL = 1e-3  # float32: fused kernels reorder sums, nothing more


def prompts(count: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(4, 100, (int(n),), generator=g).tolist() for n in torch.randint(3, 30, (count,), generator=g)]


@pytest.mark.parametrize("kind", ["tiny_llama", "tiny_qwen2", "tiny_mistral"])
@torch.no_grad()
def test_fused_equals_eager_and_hf(kind, request):
    folder = request.getfixturevalue(kind)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).cuda().eval()
    adapter = LlamaFlextronAdapter(model)
    eager = Runtime(model, adapter=adapter, max_len=128, graphs=False)
    fused = Runtime(model, adapter=adapter, max_len=128, fused=True)
    assert fused.graphs and fused.fused
    for p in prompts():
        hf = greedy_without_cache(model, p, 32)
        assert fused.generate([p], max_new_tokens=32, stop_ids=set()).tokens[0] == hf
    spec = SubnetSpec(depth=3, width=64, heads=2)
    sub = adapter.extract(spec).eval()
    for p in prompts(2):
        hf = greedy_without_cache(sub, p, 16)
        assert fused.generate([p], spec=spec, max_new_tokens=16, stop_ids=set()).tokens[0] == hf
    # One decode step's logits, fused (graph replay) vs eager, at the same cache state.
    p = prompts(1)[0]
    ids = torch.tensor([p], device="cuda")
    pad = torch.zeros(1, dtype=torch.long, device="cuda")
    logits = []
    for rt in (eager, fused):
        run = rt.runner(1)
        first = run.prefill(rt.num_layers, ids, pad).argmax(-1)  # [1, 1]
        _, out = run(0, rt.num_layers, first, rt._slots[len(p): len(p) + 1], pad, slots_end=len(p) + 1)
        logits.append(out.clone())
    assert (logits[0] - logits[1]).abs().max().item() <= LOGIT_TOL


@torch.no_grad()
def test_autotuned_gemms_give_the_same_greedy_tokens(tiny_llama):
    # Inductor's Triton GEMM templates (benchmarks/decode_suite.py's "autotuned GEMMs" rows) in float32.
    from manyinone.runtime.stack import AUTOTUNE_GEMMS, compile_step

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).cuda().eval()
    adapter = LlamaFlextronAdapter(model)
    tuned = Runtime(model, adapter=adapter, max_len=128, compile_fn=lambda fn: compile_step(fn, options=AUTOTUNE_GEMMS))
    for p in prompts(2):
        assert tuned.generate([p], max_new_tokens=24, stop_ids=set()).tokens[0] == greedy_without_cache(model, p, 24)


@pytest.mark.skipif(not os.path.isdir(REAL_MODEL), reason=f"real model not at {REAL_MODEL}")
@torch.no_grad()
def test_real_model_fused_greedy_matches_eager_for_128_steps():
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(REAL_MODEL, dtype=torch.float32).cuda().eval()
    tok = AutoTokenizer.from_pretrained(REAL_MODEL)
    eager = Runtime(model, tok, max_len=256, graphs=False)
    fused = Runtime(model, tok, max_len=256, fused=True)
    for text in ("Name three prime numbers and explain why they are prime.", "Write a haiku about the sea."):
        ids = tok(text)["input_ids"]
        want = eager.generate([ids], max_new_tokens=128, stop_ids=set()).tokens[0]
        assert fused.generate([ids], max_new_tokens=128, stop_ids=set()).tokens[0] == want


@torch.no_grad()
def test_mixed_depth_batch_under_graphs_equals_serving_alone(tiny_llama):
    """The continuous batch's segment graphs (head=False, shared prefix, deeper segments) in float32."""
    from manyinone.runtime.batching import Batcher, collect

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).cuda().eval()
    rt = Runtime(model, max_len=128)
    assert rt.graphs
    batcher = Batcher(rt, rows=4)
    specs = [{"depth": d} for d in (1, 4, 2, 3, 4, 1)]
    reqs = [batcher.submit(p, spec=s, max_new_tokens=12, stop_ids=set()) for p, s in zip(prompts(6), specs)]
    batcher.run_all()
    for req, p, s in zip(reqs, prompts(6), specs):
        assert collect(req)[0] == rt.generate([p], spec=s, max_new_tokens=12, stop_ids=set()).tokens[0]
