"""The runtime's plain decoding: same tokens as HF generate, batching, budgets, sampling, bad requests."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from manyinone.io.api import open_checkpoint
from manyinone.core.errors import ManyinoneError
from manyinone.runtime import Runtime, Sampling
from manyinone.runtime.cache import attention_masks
from manyinone.runtime.sampling import probabilities
from manyinone.testing import greedy_without_cache


def random_prompts(count: int, seed: int = 0, low: int = 3, high: int = 20) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (count,), generator=g).tolist()
    return [torch.randint(4, 100, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(model, prompt: list[int], new: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         eos_token_id=None, pad_token_id=3)
    return out[0, len(prompt):].tolist()


def test_greedy_equals_hf_generate(any_tiny_model):
    """Every architecture (sliding windows included: prompts + answers run past the window of 8)."""
    model = AutoModelForCausalLM.from_pretrained(any_tiny_model, dtype=torch.float32).eval()
    rt = Runtime(model, max_len=128)
    for prompt in random_prompts(3):
        got = rt.generate([prompt], max_new_tokens=24, stop_ids=set())
        assert got.tokens[0] == hf_greedy(model, prompt, 24)
        assert got.finish == ["length"] and got.depth == 4


def test_greedy_equals_full_forwards_past_the_window(any_tiny_model):
    """Prompts longer than the sliding window (8) too: the runtime's cached decoding equals greedy full
    forwards with no cache. (HF generate is no oracle here: on the tiny Qwen2 its cached decoding parts
    from its own full forward on these prompts; see manyinone.testing.greedy_without_cache.)"""
    model = AutoModelForCausalLM.from_pretrained(any_tiny_model, dtype=torch.float32).eval()
    rt = Runtime(model, max_len=128)
    for prompt in random_prompts(3, seed=0, low=3, high=30):
        assert rt.generate([prompt], max_new_tokens=32, stop_ids=set()).tokens[0] == greedy_without_cache(model, prompt, 32)


def test_batched_left_padded_rows_equal_single_rows(tiny_qwen2):
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32).eval()
    rt = Runtime(model, max_len=96)
    prompts = random_prompts(4, seed=1)
    batched = rt.generate(prompts, max_new_tokens=20, stop_ids=set())
    for prompt, row in zip(prompts, batched.tokens):
        assert row == rt.generate([prompt], max_new_tokens=20, stop_ids=set()).tokens[0]


def test_budget_runs_the_exported_sub_model(trained_run):
    nested = open_checkpoint(trained_run)
    rt = Runtime(nested.model, nested.tokenizer, nested.index, max_len=96)
    spec = nested.spec_for(0.6)
    assert rt.depth_for(0.6) == spec["depth"] < rt.num_layers
    sub = nested.adapter.extract(spec)
    for prompt in random_prompts(2, seed=2):
        assert rt.generate([prompt], budget=0.6, max_new_tokens=16, stop_ids=set()).tokens[0] == hf_greedy(sub, prompt, 16)
    # Back to the full budget on the same loaded model: the cache of the deeper layers is rebuilt correctly.
    prompt = random_prompts(1, seed=3)[0]
    assert rt.generate([prompt], max_new_tokens=16, stop_ids=set()).tokens[0] == hf_greedy(nested.model, prompt, 16)


def test_stop_token_ends_a_row_and_is_left_out(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    rt = Runtime(model, max_len=96)
    prompt = random_prompts(1, seed=4)[0]
    free = rt.generate([prompt], max_new_tokens=12, stop_ids=set()).tokens[0]
    stop_at = free[5]
    cut = rt.generate([prompt], max_new_tokens=12, stop_ids={stop_at})
    assert cut.tokens[0] == free[: free.index(stop_at)] and cut.finish == ["stop"]


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    rt = Runtime(model, max_len=96)
    prompt = random_prompts(1, seed=5)[0]
    a = rt.generate([prompt], max_new_tokens=12, sampling=Sampling(1.0, 1.0, seed=7), stop_ids=set()).tokens
    b = rt.generate([prompt], max_new_tokens=12, sampling=Sampling(1.0, 1.0, seed=7), stop_ids=set()).tokens
    greedy = rt.generate([prompt], max_new_tokens=12, stop_ids=set()).tokens
    nucleus = rt.generate([prompt], max_new_tokens=12, sampling=Sampling(1.0, 1e-6, seed=7), stop_ids=set()).tokens
    assert a == b and nucleus == greedy


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    probs = probabilities(logits, Sampling(1.0, 0.7))
    assert torch.allclose(probs, torch.tensor([0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]))


def test_top_p_on_candidates_equals_the_full_sort(monkeypatch):
    from manyinone.runtime import sampling

    g = torch.Generator().manual_seed(0)
    peaked = torch.randn(64, 5000, generator=g) * 6  # the top 1024 hold 0.95 of every row
    flat = torch.randn(64, 5000, generator=g) * 0.1  # they do not: the whole vocabulary is sorted
    monkeypatch.setattr(sampling, "TOP_P_CANDIDATES_FROM", 1)  # the candidate path on these small inputs
    sorts = []
    real_sort = torch.Tensor.sort
    monkeypatch.setattr(torch.Tensor, "sort", lambda self, *a, **k: sorts.append(1) or real_sort(self, *a, **k))
    for logits, expect_sort in ((peaked, 0), (flat, 1), (torch.cat([peaked, flat[:1]]), 1)):
        probs = torch.softmax(logits, -1)
        sorts.clear()
        got = sampling.nucleus(probs, 0.95)
        assert len(sorts) == expect_sort
        sorted_probs, order = real_sort(probs, dim=-1, descending=True)
        want = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, (sorted_probs.cumsum(-1) - sorted_probs) < 0.95)
        assert torch.equal(got, want)
        kept = got.sum(-1)
        assert int(kept.max()) > 1 and int(kept.max()) < probs.shape[-1]  # a real cut: not all, not only the top


def test_masks_hide_padding_future_and_out_of_window_slots():
    full, sliding = attention_masks(torch.tensor([4, 5]), torch.tensor([0, 2]), 8, torch.float32, sliding_window=3)
    seen = full == 0  # [batch, 1, q, max_len]
    assert seen[0, 0, 0].tolist() == [True] * 5 + [False] * 3
    assert seen[1, 0, 1].tolist() == [False, False] + [True] * 4 + [False] * 2
    assert (sliding == 0)[0, 0, 1].tolist() == [False] * 3 + [True] * 3 + [False] * 2


def test_bad_requests_name_the_value(trained_run):
    nested = open_checkpoint(trained_run)
    rt = Runtime(nested.model, nested.tokenizer, nested.index, max_len=32)
    with pytest.raises(ManyinoneError, match="budget 1.5 out of range"):
        rt.generate([[5, 6]], budget=1.5)
    with pytest.raises(ManyinoneError, match="exceeds the context limit of 32"):
        rt.generate([[5] * 30], max_new_tokens=8)
    with pytest.raises(ManyinoneError, match="at least one token"):
        rt.generate([[]])
    with pytest.raises(ManyinoneError, match="top_p"):
        Sampling(1.0, 0.0)
    with pytest.raises(ManyinoneError, match="CUDA graphs need a CUDA device"):
        Runtime(nested.model, graphs=True)


def test_per_exit_heads_are_used_at_their_depth(tiny_llama_tied, tmp_path):
    """A checkpoint trained with per-exit translators: budget tokens equal the folded exported sub-model's."""
    from manyinone.train.config import TrainConfig
    from manyinone.train.loop import train

    cfg = TrainConfig(model=str(tiny_llama_tied), exits=[2, 4], data="demo", max_steps=2, batch_size=4, lr=1e-2,
                      exit_heads="translator", output=str(tmp_path / "run"))
    run = train(cfg, show_progress=False)
    rt = Runtime.open(run, device="cpu", max_len=96)
    nested = open_checkpoint(run)
    spec = nested.spec_for(0.6)
    assert spec["depth"] == 2
    sub = nested.sub_model(spec)
    for prompt in random_prompts(2, seed=6):
        got = rt.generate([prompt], budget=0.6, max_new_tokens=12, stop_ids=set()).tokens[0]
        assert got == hf_greedy(sub, prompt, 12)


def test_width_nested_checkpoints_need_a_slicing_adapter(tiny_llama):
    """A width index with the depth-only adapter is refused in one line naming the axes."""
    from manyinone_llama import LlamaDepthAdapter

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    index = {"space": {"depth": {"total": 4, "choices": [4]}, "width": {"total": 128, "choices": [64, 128]}}}
    with pytest.raises(ManyinoneError, match=r"nests \['depth', 'width'\].*'llama-depth'.*serves depth only"):
        Runtime(model, index=index, adapter=LlamaDepthAdapter(model))


def test_fit_batch_sizes_the_cache_limit_to_a_job(tiny_llama):
    """A job-sized runtime (QA, distill-data) raises its cache limit to hold its batch; never lowers it."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    rt = Runtime(model, max_len=64, graphs=False)
    rt.max_cache_bytes = rt.cache_bytes(2)  # a cap of two rows
    with pytest.raises(ManyinoneError, match="send fewer prompts at once"):
        rt.runner(8)
    assert rt.fit_batch(8) is rt and rt.max_cache_bytes == rt.cache_bytes(8)
    assert rt.runner(8) is not None
    rt.fit_batch(1)
    assert rt.max_cache_bytes == rt.cache_bytes(8)
