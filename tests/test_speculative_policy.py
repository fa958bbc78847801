"""Batched speculation (each row at its own cache position), the draft policy (threshold, adaptive exits,
tuned policy in the checkpoint) and the one-line errors for bad draft settings."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from manyinone.core.errors import ManyinoneError
from manyinone.io.api import open_checkpoint
from manyinone.runtime import Runtime
from manyinone.runtime.draft_policy import (AcceptanceTracker, DraftPlan, best_length, expected_tokens, plan_for,
                                            speedup)
from manyinone.runtime.cache import StaticKVCache, live_length
from manyinone.runtime.tune import store_choice
from test_runtime import random_prompts


def load(folder) -> Runtime:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return Runtime(model, max_len=128)


def per_row_plain(rt, prompts, new, stop_ids, budget=None):
    return [rt.generate([p], budget, max_new_tokens=new, stop_ids=stop_ids).tokens[0] for p in prompts]


@pytest.mark.parametrize("rows", [4, 16])
def test_batched_speculation_equals_per_row_plain_greedy(any_tiny_model, rows):
    rt = load(any_tiny_model)
    prompts = random_prompts(rows, seed=rows)  # 3..19 tokens: left padding differs per row
    plain = per_row_plain(rt, prompts, 24, set())
    spec = rt.generate(prompts, max_new_tokens=24, stop_ids=set(), speculative=True, draft_depth=2, draft_tokens=3)
    assert spec.tokens == plain
    assert spec.stats["rounds"] > 0 and spec.stats["accepted"] <= spec.stats["drafted"]


@torch.no_grad()
@pytest.mark.parametrize("model", ["tiny_mistral", "tiny_qwen2"])
def test_batched_speculation_reads_a_live_bucket_covering_the_furthest_row(model, request, monkeypatch):
    """With 8-slot live buckets, rows whose positions drift apart cross bucket edges at different rounds;
    every draft and verify call must read a bucket past the furthest row's slots (else that row would
    attend to a cut-off cache), and the tokens stay each row's plain greedy output."""
    import manyinone.runtime.stack as stack

    rt = load(request.getfixturevalue(model))
    prompts = random_prompts(5, seed=31)
    plain = per_row_plain(rt, prompts, 24, set())
    monkeypatch.setattr(stack, "live_length", lambda n, max_len: live_length(n, max_len, 8))
    seen, real = [], rt.stack.run

    def checked(cache, start, end, inputs, slots, pad, head, last_only=False, live=None, **kwargs):
        seen.append(live)
        assert live is None or int(slots.max()) < live, (live, slots.tolist())
        return real(cache, start, end, inputs, slots, pad, head, last_only, live=live, **kwargs)

    monkeypatch.setattr(rt.stack, "run", checked)
    spec = rt.generate(prompts, max_new_tokens=24, stop_ids=set(), speculative=True, draft_depth=2, draft_tokens=3)
    assert spec.tokens == plain
    assert None not in seen and len(set(seen)) > 2 and max(seen) < rt.max_len  # buckets, never the whole cache


@torch.no_grad()
def test_batched_speculation_under_the_fused_step_traces_whole_and_equals_plain(tiny_mistral):
    """Per-row [batch, q] slots (the scatter into per-layer buffers) trace as one graph under the fused
    step's compile (no graph break allowed), and batched speculation still gives each row's plain output."""
    model = AutoModelForCausalLM.from_pretrained(tiny_mistral, dtype=torch.float32).eval()
    whole = Runtime(model, max_len=128, compile_fn=lambda fn: torch.compile(fn, backend="aot_eager", fullgraph=True,
                                                                            dynamic=False))
    prompts = random_prompts(3, seed=41)
    plain = per_row_plain(load(tiny_mistral), prompts, 12, set())
    spec = whole.generate(prompts, max_new_tokens=12, stop_ids=set(), speculative=True, draft_depth=2, draft_tokens=3)
    assert spec.tokens == plain and spec.stats["rounds"] > 0


def test_per_row_slots_write_each_row_and_return_live_views_of_fewer_heads():
    """[batch, q] slots scatter into the per-layer buffer (a heads sub-network: its first KV heads) and the
    update returns views of the first `live` slots."""
    cache = StaticKVCache(2, 2, 4, 32, 8, torch.float32, torch.device("cpu"))
    cache.slots, cache.live = torch.tensor([[3, 4], [9, 10]]), 16
    new = torch.randn(2, 2, 2, 8)  # [batch, 2 of 4 kv heads, q, head_dim]
    keys, values = cache.update(new, new + 1, 1)
    assert keys.shape == values.shape == (2, 2, 16, 8)
    buffer = cache.layer_keys[1]
    torch.testing.assert_close(buffer[0, :2, 3:5], new[0])
    torch.testing.assert_close(buffer[1, :2, 9:11], new[1])
    torch.testing.assert_close(cache.layer_values[1][1, :2, 9:11], new[1] + 1)
    written = torch.zeros_like(buffer, dtype=torch.bool)
    written[0, :2, 3:5] = written[1, :2, 9:11] = True
    assert not buffer[~written].any() and not cache.layer_keys[0].any()  # nothing else, no other layer
    assert keys.data_ptr() == buffer.data_ptr()  # a view, not a copy


def test_rows_that_stop_early_and_a_threshold(tiny_mistral):
    """Rows end at different rounds (a stop token); a confidence threshold cuts drafts short. Output is
    still each row's plain greedy output."""
    rt = load(tiny_mistral)
    prompts = random_prompts(6, seed=5)
    free = per_row_plain(rt, prompts, 20, set())
    stop = {max(set(sum(free, [])), key=sum(free, []).count)}  # the commonest token: several rows stop early
    plain = per_row_plain(rt, prompts, 20, stop)
    assert len({len(t) for t in plain}) > 1
    probe = rt.runner(1)
    first = probe.prefill(1, torch.tensor([prompts[0]]), torch.zeros(1, dtype=torch.long))[0, -1]
    threshold = float(torch.softmax(first, -1).max()) * 1.001  # just above a typical top-1: drafts get cut
    for kwargs in (dict(draft_depth=1, draft_tokens=5), dict(draft_depth=3, draft_tokens=4, draft_threshold=threshold)):
        spec = rt.generate(prompts, max_new_tokens=20, stop_ids=stop, speculative=True, **kwargs)
        assert spec.tokens == plain, kwargs
    fixed = rt.generate(prompts[:1], max_new_tokens=20, stop_ids=set(), speculative=True, draft_depth=3, draft_tokens=4)
    cut = rt.generate(prompts[:1], max_new_tokens=20, stop_ids=set(), speculative=True, draft_depth=3, draft_tokens=4,
                      draft_threshold=0.999)  # nothing is that sure: every draft stops after one token
    assert cut.tokens[0] == free[0] and cut.stats["drafted"] == cut.stats["rounds"] < fixed.stats["drafted"]


def test_adaptive_policy_equals_plain_and_uses_several_exits(trained_run_tied):
    nested = open_checkpoint(trained_run_tied)
    rt = Runtime(nested.model, nested.tokenizer, nested.index, max_len=128)
    prompts = random_prompts(4, seed=21)
    plain = per_row_plain(rt, prompts, 30, set())
    spec = rt.generate(prompts, max_new_tokens=30, stop_ids=set(), speculative=True, adaptive_draft=True,
                       draft_tokens=4)
    assert spec.tokens == plain
    assert spec.stats["adaptive"] and set(spec.stats["exits"]) <= {1, 2, 3}
    assert sum(v[0] for v in spec.stats["exits"].values()) == spec.stats["rounds"]


def test_tracker_prefers_the_exit_that_is_accepted():
    plan = DraftPlan(depth=8, exits=[2, 4], costs={2: 0.25, 4: 0.5}, prior={2: 0.5, 4: 0.5}, max_tokens=6,
                     adaptive=True)
    tracker = AcceptanceTracker(plan)
    assert tracker.choose()[0] == 2  # same prior, cheaper exit
    for _ in range(40):  # exit 2 is rejected at once, exit 4 keeps 5 of 6
        tracker.observe(2, [6], [0])
        tracker.observe(4, [6], [5])
    n, k = tracker.choose()
    assert n == 4 and k >= 3 and tracker.estimate(4) > 0.7 > 0.2 > tracker.estimate(2)
    for _ in range(40):  # now both are rejected at once: drafting cannot pay, plain steps instead
        tracker.observe(4, [6], [0])
        tracker.observe(2, [6], [0])
    assert tracker.choose()[1] == 0
    for _ in range(200):  # plain steps only decay the counts: the prior's optimism comes back
        tracker.observe(None, [], [])
    assert tracker.choose()[1] > 0


def test_cost_model_arithmetic():
    assert expected_tokens(0.0, 5) == 1 and expected_tokens(1.0, 5) == 5
    assert speedup(0.5, 0.25, 1) == pytest.approx(1.0)  # one drafted token is plain decoding
    assert speedup(0.5, 0.25, 2) == pytest.approx(1.5 / 1.25)  # 1 + 0.5 tokens for 2 drafts + the rest
    k, s = best_length(0.9, 0.1, 16)
    assert k > 4 and s > 2


def test_tuned_adaptive_policy_is_read_from_the_checkpoint(trained_run_tied, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_run_tied, ckpt)
    choice = {"depth": 4, "draft_depth": 2, "draft_tokens": 5, "adaptive": True, "threshold": 0.3,
              "exits": [{"exit": 1, "acceptance": 0.2, "cost": 0.3}, {"exit": 3, "acceptance": 0.8, "cost": 0.8}]}
    store_choice(ckpt, choice)
    stored = json.loads((ckpt / "manyinone.json").read_text())["runtime"]["speculative"]
    assert stored["adaptive"] and stored["exits"][1] == {"exit": 3, "acceptance": 0.8, "cost": 0.8}
    nested = open_checkpoint(ckpt)  # the safetensors copy of the index and the checksums agree
    rt = Runtime(nested.model, nested.tokenizer, nested.index, max_len=64)
    plan = plan_for(rt, 4)
    assert plan.adaptive and plan.exits == [1, 3] and plan.threshold == 0.3 and plan.max_tokens == 5
    assert plan.costs == {1: 0.3, 3: 0.8} and plan.prior == {1: 0.2, 3: 0.8}
    assert not plan_for(rt, 4, draft_depth=2).adaptive  # an explicit exit wins
    prompts = random_prompts(3, seed=4)
    plain = per_row_plain(rt, prompts, 12, set())
    spec = rt.generate(prompts, max_new_tokens=12, stop_ids=set(), speculative=True)
    assert spec.tokens == plain and spec.stats["adaptive"]
    hopeless = {**choice, "exits": [{"exit": 1, "acceptance": 0.0, "cost": 0.3}, {"exit": 3, "acceptance": 0.0, "cost": 0.8}]}
    rt.index = {**rt.index, "runtime": {"speculative": hopeless}}
    spec = rt.generate(prompts, max_new_tokens=12, stop_ids=set(), speculative=True)
    assert spec.tokens == plain and spec.stats["plain_steps"] == 11 and spec.stats["rounds"] == 0
    assert plan_for(rt, 3).exits == [min([1, 2], key=lambda e: (abs(e - 1), e))]  # tuned for depth 4 only


@pytest.mark.parametrize("kwargs,message", [
    (dict(draft_depth=4), "draft exit 4 out of range; allowed 1..3 (shallower than the serving depth 4)"),
    (dict(draft_depth=1, draft_tokens=0), "draft length 0 out of range; allowed 1..16"),
    (dict(draft_depth=1, draft_tokens=17), "draft length 17 out of range; allowed 1..16"),
    (dict(draft_depth=1, draft_threshold=0.0), "draft threshold 0.0 out of range; allowed 0 < threshold < 1"),
    (dict(draft_depth=1, draft_threshold=1.0), "draft threshold 1.0 out of range; allowed 0 < threshold < 1"),
    (dict(draft_depth=2, adaptive_draft=True), "draft exit 2 fixes the draft exit"),
    (dict(), "a plain model has one exit"),
])
def test_bad_draft_settings_are_one_line(tiny_llama, kwargs, message):
    rt = load(tiny_llama)
    with pytest.raises(ManyinoneError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        rt.generate([[5, 6]], speculative=True, **kwargs)
    assert "\n" not in str(err.value)


def test_speculation_on_a_one_exit_checkpoint_is_refused(trained_run, tmp_path):
    from manyinone.io.checkpoint import rewrite_index

    ckpt = tmp_path / "one"
    shutil.copytree(trained_run, ckpt)
    rewrite_index(ckpt, lambda index: {**index, "specs": [s for s in index["specs"] if s["spec"]["depth"] == 4]})
    nested = open_checkpoint(ckpt)
    rt = Runtime(nested.model, nested.tokenizer, nested.index, max_len=64)
    with pytest.raises(ManyinoneError, match="speculation needs a checkpoint with at least two exits; this one has "
                                             "only exit 4"):
        rt.generate([[5, 6]], speculative=True, draft_depth=2)


def test_cli_generate_speculative_and_bad_draft_flags(trained_run):
    from typer.testing import CliRunner

    from manyinone.cli import app

    cli = CliRunner()
    base = ["generate", str(trained_run), "--prompt", "Name a colour.", "--max-new-tokens", "8", "--device", "cpu"]
    plain = cli.invoke(app, base)
    spec = cli.invoke(app, base + ["--speculative", "--draft-exit", "2", "--draft-tokens", "3"])
    assert plain.exit_code == 0 and spec.exit_code == 0, spec.output
    assert "drafted tokens accepted" in spec.output
    from manyinone.eval.session import generate_speculative, generate_text

    text, _ = generate_text(trained_run, "Name a colour.", None, 8, 0.0, 1.0, None, 0)
    fast, _, stats = generate_speculative(trained_run, "Name a colour.", None, 8, 0.0, 1.0, None, 0,
                                          {"draft_depth": 2, "draft_tokens": 3}, device="cpu")
    assert fast == text and stats["drafted"] > 0  # HF's greedy text, through the runtime's speculation
    for flags, message in ((["--speculative", "--draft-exit", "4"], "draft exit 4 out of range; allowed 1..3"),
                           (["--speculative", "--draft-tokens", "0"], "draft length 0 out of range; allowed 1..16"),
                           (["--speculative", "--draft-threshold", "1"], "draft threshold 1.0 out of range"),
                           (["--draft-exit", "2"], "--draft-exit need --speculative")):
        bad = cli.invoke(app, base + flags)
        assert bad.exit_code == 2 and f"error: {message}" in bad.output, bad.output
        assert len([line for line in bad.output.splitlines() if line.startswith("error:")]) == 1


def test_drafts_exit_through_the_checkpoints_translator_heads(tiny_llama_tied, tmp_path):
    from manyinone.core.space import SubnetSpec
    from manyinone.train.config import TrainConfig
    from manyinone.train.loop import train

    cfg = TrainConfig(model=str(tiny_llama_tied), exits=[2, 4], data="demo", max_steps=2, batch_size=4, lr=1e-2,
                      exit_heads="translator", output=str(tmp_path / "translator"))
    nested = open_checkpoint(train(cfg, show_progress=False))
    rt = Runtime.from_nested(nested, max_len=96)
    through = rt.stack.exit_logits
    ends = []
    rt.stack.exit_logits = lambda end, hidden: ends.append(end) or through(end, hidden)
    prompts = random_prompts(3, seed=8)
    plain = per_row_plain(rt, prompts, 16, set())
    ends.clear()
    spec = rt.generate(prompts, max_new_tokens=16, stop_ids=set(), speculative=True, draft_depth=2, draft_tokens=3)
    assert spec.tokens == plain and 2 in ends and 4 in ends  # drafts at exit 2, verification at depth 4
    hidden = torch.randn(1, 1, nested.model.config.hidden_size)
    own = nested.exit_logits(SubnetSpec({"depth": 2}), hidden)
    assert torch.equal(through(2, hidden), own) and not torch.allclose(own, nested.adapter.exit_logits(hidden))
