"""Self-speculative decoding: greedy output equal to the full model's, KV reuse, lossless sampling, tuning."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM

from manyinone.io.api import open_checkpoint
from manyinone.core.errors import ManyinoneError
from manyinone.runtime import Runtime, Sampling
from manyinone.runtime.sampling import accept_sampled
from manyinone.runtime.tune import autotune, store_choice
from test_runtime import random_prompts


def load(folder) -> Runtime:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return Runtime(model, max_len=128)


def silence_layers_from(model, n: int) -> None:
    """Zero the residual writes of layers >= n, so the depth-n draft is exactly the full model."""
    with torch.no_grad():
        for layer in model.model.layers[n:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()


@pytest.mark.parametrize("draft_depth,draft_tokens", [(1, 1), (1, 4), (2, 3), (3, 6)])
def test_greedy_speculation_equals_plain_decoding(any_tiny_model, draft_depth, draft_tokens):
    rt = load(any_tiny_model)
    for prompt in random_prompts(4, seed=draft_depth * 10 + draft_tokens):
        plain = rt.generate([prompt], max_new_tokens=30, stop_ids=set())
        spec = rt.generate([prompt], max_new_tokens=30, stop_ids=set(), speculative=True,
                           draft_depth=draft_depth, draft_tokens=draft_tokens)
        assert spec.tokens == plain.tokens
        # a round drafts k tokens, fewer only near the end (never past max_new_tokens)
        assert spec.stats["drafted"] <= spec.stats["rounds"] * draft_tokens
        assert spec.stats["exits"] == {draft_depth: [spec.stats["rounds"], spec.stats["drafted"], spec.stats["accepted"]]}


def test_full_acceptance_path_and_stop_inside_an_accepted_run(tiny_llama):
    """A draft that is exactly the full model: every drafted token is accepted, rounds of k tokens."""
    rt = load(tiny_llama)
    silence_layers_from(rt.model, 2)
    prompt = random_prompts(1, seed=9)[0]
    plain = rt.generate([prompt], max_new_tokens=25, stop_ids=set())
    spec = rt.generate([prompt], max_new_tokens=25, stop_ids=set(), speculative=True, draft_depth=2, draft_tokens=4)
    assert spec.tokens == plain.tokens and spec.stats["accepted"] == spec.stats["drafted"]
    stop = plain.tokens[0][10]
    cut = rt.generate([prompt], max_new_tokens=25, stop_ids={stop}, speculative=True, draft_depth=2, draft_tokens=4)
    assert cut.tokens[0] == plain.tokens[0][: plain.tokens[0].index(stop)] and cut.finish == ["stop"]


def test_kv_reuse_no_layer_runs_twice_and_the_cache_matches_plain_decoding(tiny_mistral):
    rt = load(tiny_mistral)
    calls = Counter()
    hooks = [layer.register_forward_hook(lambda m, i, o, k=idx: calls.update([k]))
             for idx, layer in enumerate(rt.model.model.layers)]
    prompt, new = random_prompts(1, seed=11)[0], 30
    spec = rt.generate([prompt], max_new_tokens=new, stop_ids=set(), speculative=True, draft_depth=2, draft_tokens=3)
    for h in hooks:
        h.remove()
    rounds = spec.stats["rounds"]
    # Layers 0..1 run once in prefill and once per drafted position; 2..3 once in prefill and once per verify.
    assert calls[0] == calls[1] == 1 + spec.stats["drafted"]
    assert calls[2] == calls[3] == 1 + rounds
    spec_cache = rt.runner(1).cache
    committed = len(prompt) + new - 1  # the last token's keys/values are not needed yet
    spec_k, spec_v = spec_cache.keys[:, :, :, :committed].clone(), spec_cache.values[:, :, :, :committed].clone()
    rt.generate([prompt], max_new_tokens=new, stop_ids=set())
    torch.testing.assert_close(spec_k, spec_cache.keys[:, :, :, :committed], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(spec_v, spec_cache.values[:, :, :, :committed], rtol=1e-4, atol=1e-5)


def test_speculative_sampling_keeps_the_target_distribution():
    """The first emitted token (accepted draft or replacement) is distributed as the target p."""
    p = torch.tensor([0.5, 0.2, 0.2, 0.1])
    q = torch.tensor([0.1, 0.6, 0.1, 0.2])
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    trials = 4000
    for _ in range(trials):
        draft = torch.multinomial(q, 1, generator=g)
        accepted, fix = accept_sampled(draft, q[None], p[None], g)
        counts[int(draft[0]) if int(accepted) == 1 else int(fix)] += 1
    assert torch.allclose(counts / trials, p, atol=0.03)


def test_sampled_speculation_runs_and_is_seeded(tiny_llama):
    rt = load(tiny_llama)
    prompt = random_prompts(1, seed=12)[0]
    kwargs = dict(max_new_tokens=20, stop_ids=set(), speculative=True, draft_depth=2, draft_tokens=3,
                  sampling=Sampling(0.8, 0.95, seed=3))
    a, b = rt.generate([prompt], **kwargs), rt.generate([prompt], **kwargs)
    assert a.tokens == b.tokens and len(a.tokens[0]) == 20


def test_bad_draft_settings(tiny_llama):
    rt = load(tiny_llama)
    with pytest.raises(ManyinoneError, match="draft exit 4 out of range; allowed 1..3"):
        rt.generate([[5, 6]], speculative=True, draft_depth=4)
    with pytest.raises(ManyinoneError, match="draft length 0 out of range"):
        rt.generate([[5, 6]], speculative=True, draft_depth=1, draft_tokens=0)


def test_autotune_stores_its_choice_and_the_runtime_uses_it(trained_run_tied, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_run_tied, ckpt)
    nested = open_checkpoint(ckpt)
    rt = Runtime(nested.model, nested.tokenizer, nested.index, max_len=96)
    choice = autotune(rt, random_prompts(2, seed=13), max_new_tokens=12, draft_lengths=(2, 3))
    fixed = [t for t in choice["trials"] if "draft_threshold" not in t and not t.get("adaptive")]
    assert {(t["draft_depth"], t["draft_tokens"]) for t in fixed} == {(n, k) for n in (1, 2, 3) for k in (2, 3)}
    assert {(t.get("adaptive", False), t["draft_threshold"]) for t in choice["trials"] if "draft_threshold" in t} == {
        (False, 0.5), (True, None), (True, 0.5)}
    assert [e["exit"] for e in choice["exits"]] == [1, 2, 3] and all(0 < e["cost"] <= 1 for e in choice["exits"])
    best = max(choice["trials"], key=lambda t: t["tokens_per_s"])
    assert choice["tokens_per_s"] == best["tokens_per_s"] and choice["adaptive"] == bool(best.get("adaptive"))
    store_choice(ckpt, choice)
    stored = json.loads((ckpt / "manyinone.json").read_text())["runtime"]["speculative"]
    assert (stored["draft_depth"], stored["draft_tokens"]) == (choice["draft_depth"], choice["draft_tokens"])
    assert stored["exits"] == choice["exits"] and stored["threshold"] == choice["threshold"]
    reopened = open_checkpoint(ckpt)
    rt2 = Runtime(reopened.model, reopened.tokenizer, reopened.index, max_len=96)
    out = rt2.generate([[5, 6, 7]], max_new_tokens=8, stop_ids=set(), speculative=True)
    assert (out.stats["adaptive"], out.stats["draft_tokens"], out.stats["threshold"]) == (
        choice["adaptive"], choice["draft_tokens"], choice["threshold"])
    if not choice["adaptive"]:
        assert out.stats["draft_depth"] == choice["draft_depth"]


def test_cli_tune_speculative_writes_the_choice_and_bad_input_is_one_line(trained_run, tmp_path):
    from typer.testing import CliRunner

    from manyinone.cli import app

    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_run, ckpt)
    result = CliRunner().invoke(app, ["tune-speculative", str(ckpt), "--prompts", "1", "--max-new-tokens", "6",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads((ckpt / "manyinone.json").read_text())["runtime"]["speculative"]["draft_depth"] == 2
    open_checkpoint(ckpt)  # checksums still verify after the index changed
    bad = CliRunner().invoke(app, ["serve", str(ckpt), "--dtype", "int3"])
    assert bad.exit_code == 2 and "error: dtype 'int3' unknown" in bad.output
