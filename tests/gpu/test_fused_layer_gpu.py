"""CUDA: the fused LLaMA-layout decode forward (one GEMM for q/k/v, one for gate/up) inside the compiled,
graph-recorded step: its parameters stay views of the fused buffers on the GPU, one step's logits equal
the eager HF layers (float32, full size and a width/heads plan), and on the real model (SmolLM2 at
/root/smollm2-hf, skipped when absent) 64 greedy tokens equal full forwards without a cache. Skipped
without CUDA."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from manyinone.core.space import SubnetSpec
from manyinone.runtime import Runtime
from manyinone.testing import greedy_without_cache
from manyinone_flextron import LlamaFlextronAdapter
from manyinone_llama.fused import FusedDecoderLayer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
REAL_MODEL = os.environ.get("MANYINONE_REAL_MODEL", "/root/smollm2-hf")
LOGIT_TOL = 1e-3  # float32: Inductor's kernels reorder sums, nothing more


def one_step_logits(rt: Runtime, prompt: list[int], spec=None) -> torch.Tensor:
    depth, plan = rt.target(spec=spec)
    ids = torch.tensor([prompt], device="cuda")
    pad = torch.zeros(1, dtype=torch.long, device="cuda")
    run = rt.runner(1)
    first = run.prefill(depth, ids, pad, plan).argmax(-1)  # [1, 1]
    _, out = run(0, depth, first, rt._slots[len(prompt): len(prompt) + 1], pad, slots_end=len(prompt) + 1, plan=plan)
    return out.clone()


@pytest.mark.parametrize("kind", ["tiny_qwen2", "tiny_mistral"])
@torch.no_grad()
def test_fused_layers_on_cuda_equal_the_eager_layers(kind, request):
    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(kind), dtype=torch.float32).cuda().eval()
    adapter = LlamaFlextronAdapter(model)
    eager = Runtime(model, adapter=adapter, max_len=128, graphs=False)
    fused = Runtime(model, adapter=adapter, max_len=128, fused=True)
    assert all(isinstance(f, FusedDecoderLayer) for f in fused.stack.fused) and fused.stack.fused.shares_storage()
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.v_proj.weight.untyped_storage().data_ptr()
    prompt = list(range(5, 25))  # past the sliding window of 8
    for spec in (None, SubnetSpec(depth=3, width=64, heads=2)):
        a, b = one_step_logits(eager, prompt, spec), one_step_logits(fused, prompt, spec)
        assert (a - b).abs().max().item() <= LOGIT_TOL, spec


@pytest.mark.skipif(not os.path.isdir(REAL_MODEL), reason=f"real model not at {REAL_MODEL}")
@torch.no_grad()
def test_fused_layers_on_the_real_model_equal_full_forwards():
    model = AutoModelForCausalLM.from_pretrained(REAL_MODEL, dtype=torch.float32).cuda().eval()
    rt = Runtime(model, max_len=256, fused=True)
    assert all(isinstance(f, FusedDecoderLayer) for f in rt.stack.fused)
    prompt = list(range(100, 140))
    assert rt.generate([prompt], max_new_tokens=64, stop_ids=set()).tokens[0] == greedy_without_cache(model, prompt, 64)
