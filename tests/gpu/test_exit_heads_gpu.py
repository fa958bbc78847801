"""CUDA: steps that end at an exit with its own head (every registered exit-head kind), Inductor-compiled and
recorded as CUDA graphs (`Runtime(fused=True)`): the eager runtime's logits, plain greedy's tokens from
speculation in float32, and the step-cost measurement the speculative sweep starts with. Under torch 2.11
these steps failed to trace ("'LinearHead' object has no attribute 'norm'") before the runtime resolved
each exit's head into modules (manyinone.runtime.exit_logits). Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from manyinone.core.kinds import EXIT_HEAD_KINDS
from manyinone.runtime import Runtime
from manyinone.runtime.tune import measure_step_costs
from test_exit_heads_runtime import step_logits, with_heads
from test_runtime import random_prompts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@torch.no_grad()
@pytest.mark.parametrize("kind", list(EXIT_HEAD_KINDS.names()))
def test_fused_cuda_steps_through_exit_heads(trained_run_tied, kind):
    nested = with_heads(trained_run_tied, kind, device="cuda")
    eager = Runtime.from_nested(nested, max_len=128, graphs=False)
    fused = Runtime.from_nested(nested, max_len=128, fused=True)
    costs = measure_step_costs(fused, 4, [1, 2, 3], steps=3)  # where the H200 sweep failed
    assert set(costs) == {1, 2, 3} and all(0 < c <= 1 for c in costs.values())
    prompt = random_prompts(1, seed=3)[0]
    for depth in (2, 4):
        _, logits = step_logits(eager, prompt, depth)
        _, fused_logits = step_logits(fused, prompt, depth)
        torch.testing.assert_close(fused_logits, logits, rtol=1e-4, atol=1e-4)
    prompts = random_prompts(2, seed=9)
    plain = [fused.generate([p], max_new_tokens=16, stop_ids=set()).tokens[0] for p in prompts]
    out = fused.generate(prompts, max_new_tokens=16, stop_ids=set(), speculative=True, draft_depth=2, draft_tokens=3)
    assert out.tokens == plain and out.stats["rounds"] > 0
