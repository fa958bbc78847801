"""CUDA: batched self-speculation under recorded CUDA graphs (per-row cache positions, threshold, adaptive
policy) equals per-row plain greedy decoding in float32; sampled speculation is seeded. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from manyinone.io.api import open_checkpoint
from manyinone.runtime import Runtime, Sampling

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def prompts(count: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(count)
    return [torch.randint(4, 100, (int(n),), generator=g).tolist() for n in torch.randint(3, 30, (count,), generator=g)]


@pytest.mark.parametrize("rows", [1, 4, 16])
def test_batched_speculation_under_graphs_equals_per_row_plain(trained_run_tied, rows):
    nested = open_checkpoint(trained_run_tied, device="cuda")
    rt = Runtime(nested.model, nested.tokenizer, nested.index, max_len=128, graphs=True)
    batch = prompts(rows)
    plain = [rt.generate([p], max_new_tokens=32, stop_ids=set()).tokens[0] for p in batch]
    for kwargs in (dict(draft_depth=1, draft_tokens=4), dict(draft_depth=2, draft_tokens=6, draft_threshold=0.02),
                   dict(adaptive_draft=True, draft_tokens=8)):
        out = rt.generate(batch, max_new_tokens=32, stop_ids=set(), speculative=True, **kwargs)
        assert out.tokens == plain, kwargs
    sampled = dict(max_new_tokens=16, stop_ids=set(), speculative=True, draft_depth=2, draft_tokens=3,
                   sampling=Sampling(0.8, 0.9, seed=3))
    assert rt.generate(batch, **sampled).tokens == rt.generate(batch, **sampled).tokens


@pytest.mark.parametrize("rows", [1, 4])
def test_speculation_on_fused_steps_equals_plain_and_never_recompiles(trained_run_tied, rows):
    """Runtime(fused=True): Inductor-compiled steps recorded as CUDA graphs; float32 speculation (fixed,
    threshold, adaptive) gives plain greedy's tokens, and a repeated request compiles nothing."""
    nested = open_checkpoint(trained_run_tied, device="cuda")
    rt = Runtime(nested.model, nested.tokenizer, nested.index, max_len=128, fused=True)
    batch = prompts(rows)
    # The same runtime's plain decoding, row by row (fused against eager: tests/gpu/test_fused_gpu.py).
    plain = [rt.generate([p], max_new_tokens=24, stop_ids=set()).tokens[0] for p in batch]
    for kwargs in (dict(draft_depth=1, draft_tokens=4), dict(draft_depth=2, draft_tokens=4, draft_threshold=0.02),
                   dict(adaptive_draft=True, draft_tokens=4)):
        assert rt.generate(batch, max_new_tokens=24, stop_ids=set(), speculative=True, **kwargs).tokens == plain, kwargs
        before = rt.compile_log.compiles
        assert rt.generate(batch, max_new_tokens=24, stop_ids=set(), speculative=True, **kwargs).tokens == plain
        assert rt.compile_log.compiles == before, kwargs
