"""CUDA: the runtime's recorded CUDA graphs give the same tokens as its eager steps and as HF generate,
and greedy self-speculation under graphs equals plain decoding. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from manyinone.runtime import Runtime, Sampling
from manyinone.testing import greedy_without_cache

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def prompts(count: int = 4) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(4, 100, (int(n),), generator=g).tolist() for n in torch.randint(3, 30, (count,), generator=g)]


@pytest.mark.parametrize("kind", ["tiny_llama", "tiny_qwen2"])
def test_graphs_equal_eager_and_hf(kind, request):
    folder = request.getfixturevalue(kind)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).cuda().eval()
    graphed, eager = Runtime(model, max_len=128, graphs=True), Runtime(model, max_len=128, graphs=False)
    for p in prompts():
        hf = greedy_without_cache(model, p, 32)
        a = graphed.generate([p], max_new_tokens=32, stop_ids=set()).tokens[0]
        assert a == eager.generate([p], max_new_tokens=32, stop_ids=set()).tokens[0] == hf
        for n, k in ((1, 3), (2, 4), (3, 2)):
            assert graphed.generate([p], max_new_tokens=32, stop_ids=set(), speculative=True, draft_depth=n,
                                    draft_tokens=k).tokens[0] == a
    batch = graphed.generate(prompts(), max_new_tokens=16, stop_ids=set()).tokens
    assert batch == [graphed.generate([p], max_new_tokens=16, stop_ids=set()).tokens[0] for p in prompts()]
    sampled = Sampling(0.8, 0.9, seed=1)
    assert (graphed.generate(prompts(1), max_new_tokens=16, sampling=sampled, stop_ids=set()).tokens
            == eager.generate(prompts(1), max_new_tokens=16, sampling=sampled, stop_ids=set()).tokens)
