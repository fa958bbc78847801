"""Mixed-budget continuous batching: every request in a shared batch (different depths, joins and leaves
between steps, a width plan) gets exactly the tokens it gets served alone (greedy, float32)."""

from __future__ import annotations

import pytest
import torch

from manyinone.core.errors import ManyinoneError
from manyinone.io.api import open_checkpoint
from manyinone.runtime import Runtime
from manyinone.runtime.batching import Batcher, collect
from test_runtime import random_prompts


@pytest.fixture(scope="module")
def runtime(trained_run):
    nested = open_checkpoint(trained_run)
    return Runtime(nested.model, nested.tokenizer, nested.index, max_len=128)


def alone(rt, prompt, budget, new, **kw):
    return rt.generate([prompt], budget=budget, max_new_tokens=new, stop_ids=set(), **kw).tokens[0]


# Budgets of the trained run (exits 2 and 4) and explicit depths 1 and 3: four depths in one batch.
TARGETS = [(0.6, None), (None, {"depth": 1}), (1.0, None), (None, {"depth": 3}), (0.6, None), (None, {"depth": 1})]


@torch.no_grad()
def test_mixed_budgets_in_one_batch_equal_each_request_alone(runtime):
    assert len({runtime.target(b, s)[0] for b, s in TARGETS}) == 4  # the rows really leave at different depths
    prompts = random_prompts(len(TARGETS), seed=21)
    batcher = Batcher(runtime, rows=4)
    reqs = [batcher.submit(p, b, max_new_tokens=10 + i, stop_ids=set(), spec=s)
            for i, (p, (b, s)) in enumerate(zip(prompts, TARGETS))]
    batcher.run_all()
    for i, (req, p, (b, s)) in enumerate(zip(reqs, prompts, TARGETS)):
        tokens, finish = collect(req)
        assert tokens == alone(runtime, p, b, 10 + i, spec=s) and finish == "length", (i, b, s)


@torch.no_grad()
def test_joins_and_leaves_between_steps_equal_serial_serving(runtime):
    """Requests arrive while others decode (a longer prompt waits for the slot counter), rows leave early."""
    prompts = random_prompts(5, seed=22, low=3, high=12)
    batcher = Batcher(runtime, rows=3)
    plan = [(0, prompts[0], 1.0, 12), (0, prompts[1], 0.6, 4), (2, prompts[2], 0.6, 9), (3, prompts[3], None, 6),
            (5, prompts[4], 0.6, 8)]
    reqs, occupancy = {}, []
    for step in range(200):
        for i, (at, p, b, n) in enumerate(plan):
            if at == step:
                reqs[i] = batcher.submit(p, b, max_new_tokens=n, stop_ids=set())
        if not batcher.step() and len(reqs) == len(plan) and not batcher.pending():
            break
        occupancy.append(len(batcher.active()))
    assert max(occupancy) >= 2 and batcher.steps < sum(n for *_, n in plan)  # shared steps really happened
    for i, (_, p, b, n) in enumerate(plan):
        assert collect(reqs[i])[0] == alone(runtime, p, b, n), i


@torch.no_grad()
def test_stop_tokens_and_cancel_free_the_row(runtime):
    prompt = random_prompts(1, seed=23)[0]
    free = alone(runtime, prompt, None, 12)
    batcher = Batcher(runtime, rows=2)
    stopped = batcher.submit(prompt, None, max_new_tokens=12, stop_ids={free[4]})
    gone = batcher.submit(prompt, 0.6, max_new_tokens=12, stop_ids=set())
    batcher.step()
    gone.cancel.set()
    batcher.run_all()
    assert collect(stopped) == (free[: free.index(free[4])], "stop")
    assert collect(gone)[1] == "cancelled" and batcher.active() == []


def test_bad_requests_are_refused_at_submit(runtime):
    batcher = Batcher(runtime, rows=2)
    with pytest.raises(ManyinoneError, match="budget 1.5 out of range"):
        batcher.submit([5, 6], 1.5)
    with pytest.raises(ManyinoneError, match="exceeds the context limit of 128"):
        batcher.submit([5] * 120, None, max_new_tokens=16)
    with pytest.raises(ManyinoneError, match="batch rows 0 out of range"):
        Batcher(runtime, rows=0)
    assert not batcher.pending()


@torch.no_grad()
def test_width_plans_batch_with_their_own_plan(tiny_llama):
    from transformers import AutoModelForCausalLM

    from manyinone_flextron import LlamaFlextronAdapter

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    rt = Runtime(model, adapter=LlamaFlextronAdapter(model), max_len=96)
    specs = [{"width": 64, "heads": 2}, None, {"width": 64, "heads": 2}, {"depth": 2}]
    prompts = random_prompts(4, seed=24)
    batcher = Batcher(rt, rows=4)
    reqs = [batcher.submit(p, None, max_new_tokens=8, stop_ids=set(), spec=s) for p, s in zip(prompts, specs)]
    batcher.run_all()
    for req, p, s in zip(reqs, prompts, specs):
        assert collect(req)[0] == rt.generate([p], spec=s, max_new_tokens=8, stop_ids=set()).tokens[0]


@torch.no_grad()
def test_sampled_rows_keep_their_own_seeded_stream(runtime):
    """Each row samples with its own generator: the same tokens as that request sampled alone."""
    from manyinone.runtime import Sampling

    prompts = random_prompts(3, seed=25)
    settings = [Sampling(0.8, 0.9, seed=1), Sampling(), Sampling(1.2, 1.0, seed=2)]
    batcher = Batcher(runtime, rows=3)
    reqs = [batcher.submit(p, 0.6 if i == 1 else None, max_new_tokens=10, sampling=s, stop_ids=set())
            for i, (p, s) in enumerate(zip(prompts, settings))]
    batcher.run_all()
    for i, (req, p, s) in enumerate(zip(reqs, prompts, settings)):
        want = runtime.generate([p], budget=0.6 if i == 1 else None, max_new_tokens=10, sampling=s, stop_ids=set())
        assert collect(req)[0] == want.tokens[0], i
