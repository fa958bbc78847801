"""Self-speculation on fused (compiled) decode steps: the same tokens as plain greedy in float32, at batch 1
and 4, fixed and adaptive policies, with one static shape per (segment, q, batch, live bucket) so that a
repeated run compiles nothing, and a refusal before dynamo's recompile limit.

On CPU `compile_step(fn, "aot_eager")` traces each step as `Runtime(fused=True)` compiles it, without
code generation (as tests/test_runtime_axes.py does)."""

from __future__ import annotations

import pytest
import torch

import manyinone.runtime.stack as stack
from manyinone.core.errors import ManyinoneError
from manyinone.io.api import open_checkpoint
from manyinone.runtime import Runtime
from manyinone.runtime.stack import CompileLog, compile_step
from test_runtime import random_prompts


def traced(fn):
    return compile_step(fn, "aot_eager")  # what fused=True compiles, traced only


def runtimes(folder) -> tuple[Runtime, Runtime]:
    """(eager, fused) runtimes over one float32 checkpoint with exits 1, 2, 3 of 4 layers."""
    nested = open_checkpoint(folder)
    eager = Runtime(nested.model, nested.tokenizer, nested.index, max_len=96)
    fused = Runtime(nested.model, nested.tokenizer, nested.index, max_len=96, compile_fn=traced)
    return eager, fused


def verify_shapes(rt: Runtime, rows: int, depth: int) -> dict[int, set]:
    """Input shapes each verify segment (n..depth) of the `rows`-row runner was traced for, per exit n."""
    out: dict[int, set] = {}
    for (start, end, *_), shapes in rt.runner(rows).shapes.items():  # (start, end, head, live, fill)
        if start > 0 and end == depth:
            out.setdefault(start, set()).update(s[0] for s in shapes)
    return out


POLICIES = {
    "fixed": {"draft_depth": 2, "draft_tokens": 3},
    "fixed, threshold": {"draft_depth": 1, "draft_tokens": 4, "draft_threshold": 0.6},
    "adaptive": {"adaptive_draft": True, "draft_tokens": 4},
}


@torch.no_grad()
@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_fused_speculation_equals_plain_greedy_and_never_recompiles(trained_run_tied, rows, policy):
    eager, fused = runtimes(trained_run_tied)
    prompts = random_prompts(rows, seed=50 + rows)
    new = 20
    plain = [eager.generate([p], max_new_tokens=new, stop_ids=set()).tokens[0] for p in prompts]
    assert fused.generate(prompts, max_new_tokens=new, stop_ids=set()).tokens == plain  # fused plain, all rows
    settings = POLICIES[policy]
    spec = fused.generate(prompts, max_new_tokens=new, stop_ids=set(), speculative=True, **settings)
    assert spec.tokens == plain
    assert spec.stats["rounds"] > 0 and spec.stats["accepted"] <= spec.stats["drafted"]
    if policy == "adaptive":
        assert spec.stats["adaptive"] and set(spec.stats["exits"]) <= {1, 2, 3}
    # Static shapes: every verify pass ran the policy's longest draft, however short the draft (a threshold,
    # the end of the request, an adaptive length), so each exit has exactly one verify graph.
    k = settings["draft_tokens"]
    shapes = verify_shapes(fused, rows, 4)
    assert shapes and all(s == {(rows, k, fused.model.config.hidden_size)} for s in shapes.values()), shapes
    assert fused.compile_log.compiles > 0 and fused.compile_log.seconds > 0
    # The same request again (what a benchmark times after its warm-up) traces nothing new.
    before = fused.compile_log.snapshot()[0]
    again = fused.generate(prompts, max_new_tokens=new, stop_ids=set(), speculative=True, **settings)
    assert again.tokens == plain and fused.compile_log.compiles == before


@torch.no_grad()
def test_a_set_verify_width_serves_every_draft_length_with_one_verify_graph(trained_run_tied):
    eager, fused = runtimes(trained_run_tied)
    fused.verify_width = 4
    prompt = random_prompts(1, seed=61)[0]
    plain = eager.generate([prompt], max_new_tokens=16, stop_ids=set()).tokens
    for k in (1, 2, 3, 4):
        spec = fused.generate([prompt], max_new_tokens=16, stop_ids=set(), speculative=True, draft_depth=2,
                              draft_tokens=k)
        assert spec.tokens == plain, k
    assert verify_shapes(fused, 1, 4) == {2: {(1, 4, fused.model.config.hidden_size)}}
    fused.verify_width = 17
    with pytest.raises(ManyinoneError, match="verify width 17 out of range; allowed 1..16"):
        fused.generate([prompt], max_new_tokens=4, speculative=True, draft_depth=2, draft_tokens=2)


def test_a_compiled_step_past_the_recompile_limit_is_refused(trained_run_tied, monkeypatch):
    """Past dynamo's limit a step would run eagerly without a word; the runtime refuses the variant instead."""
    _, fused = runtimes(trained_run_tied)
    monkeypatch.setattr(stack, "RECOMPILE_LIMIT", 2)
    run = fused.runner(1)
    pad = torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        for q in (1, 2):  # two shapes of one step: within the limit
            run(0, 2, torch.zeros(1, q, dtype=torch.long), fused._slots[:q], pad, slots_end=q)
        assert fused.compile_log.compiles == 2
        with pytest.raises(ManyinoneError, match=r"over the recompile limit of 2"):
            run(0, 2, torch.zeros(1, 3, dtype=torch.long), fused._slots[:3], pad, slots_end=3)
        run(0, 2, torch.zeros(1, 1, dtype=torch.long), fused._slots[:1], pad, slots_end=1)  # a known shape: fine
    log = CompileLog()
    log.admit(set(), ((1, 1), (1,), None), (0, 2, True, 8))
    assert log.compiles == 1


def test_tuned_step_costs_apply_to_the_runtime_kind_they_were_measured_on(trained_run_tied):
    """A policy tuned on fused steps keeps its acceptance on an eager runtime, but not its measured costs."""
    from manyinone.runtime.draft_policy import index_costs, plan_for

    eager, fused = runtimes(trained_run_tied)
    exits = [{"exit": n, "cost": 0.9, "acceptance": 0.7} for n in (1, 2, 3)]
    for rt in (eager, fused):
        rt.index = {**rt.index, "runtime": {"speculative": {"depth": 4, "adaptive": True, "exits": exits,
                                                            "fused": True}}}
    assert plan_for(fused, 4).costs == {1: 0.9, 2: 0.9, 3: 0.9}
    on_eager = plan_for(eager, 4)
    assert on_eager.costs == index_costs(eager.index, [1, 2, 3], 4) and on_eager.prior[2] == 0.7


def test_autotune_on_a_fused_runtime_times_fused_steps_warmed_and_keeps_to_its_deadline(trained_run_tied):
    """The tuner's choice comes from fused timings: every trial is warmed by an identical run (nothing
    compiles while timed), every verify pass has one width, and past the deadline no new exit starts."""
    import time

    from manyinone.runtime.tune import autotune

    _, fused = runtimes(trained_run_tied)
    prompts = random_prompts(1, seed=71)
    choice = autotune(fused, prompts, max_new_tokens=10, draft_lengths=(1, 2), thresholds=(0.5,),
                      deadline=time.perf_counter())  # already past: only the first exit is timed
    assert choice["fused"] and choice["verify_width"] == 4 and fused.verify_width is None  # restored
    assert {t["draft_depth"] for t in choice["trials"]} == {1}
    assert [(s["draft_depth"], s["draft_tokens"]) for s in choice["skipped"]] == [(2, 1), (2, 2), (3, 1), (3, 2)]
    assert all(t["timed_compiles"] == 0 for t in choice["trials"]) and choice["baseline_warmup"]["timed_compiles"] == 0
    assert choice["compiles"] > 0 and choice["trials"][0]["compile_s"] > 0
    assert verify_shapes(fused, 1, 4) == {1: {(1, 4, fused.model.config.hidden_size)}}
