"""runtime.attention: grouped-query decode attention that reads each KV head once equals transformers'
own SDPA function (which copies the cache to every query head), and the runtime's decode steps use it."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.integrations import sdpa_attention

from manyinone.runtime import Runtime, attention
from manyinone.runtime.attention import NAME, PACKED_QUERIES, decode_attention, grouped_sdpa
from manyinone.runtime.cache import attention_masks


class Grouped(torch.nn.Module):
    """What transformers' attention functions read off the attention module."""

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups, self.is_causal, self.training = groups, True, False


def inputs(q: int, keys: int = 12, batch: int = 3, kv: int = 2, groups: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, kv * groups, q, 8, generator=g)
    key, value = (torch.randn(batch, kv, keys, 8, generator=g) for _ in range(2))
    pad = torch.tensor([0, 2, 5])[:batch]  # left padding per row
    slots = torch.arange(keys - q, keys)
    mask, _ = attention_masks(slots, pad, keys, torch.float32)  # [batch, 1, q, keys], additive
    return query, key, value, mask


@pytest.mark.parametrize("q", [1, 3, 9])
def test_grouped_equals_transformers_sdpa(q):
    query, key, value, mask = inputs(q)
    module = Grouped(3)
    want, _ = sdpa_attention.sdpa_attention_forward(module, query, key, value, mask, scaling=0.35)
    got, _ = grouped_sdpa(module, query, key, value, mask, scaling=0.35)
    assert got.shape == want.shape == (3, q, 6, 8)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # a boolean mask (True = attend) too (rows with no visible key included: each function's own answer)
    want_bool, _ = sdpa_attention.sdpa_attention_forward(module, query, key, value, mask == 0, scaling=0.35)
    got_bool, _ = grouped_sdpa(module, query, key, value, mask == 0, scaling=0.35)
    torch.testing.assert_close(got_bool, want_bool, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_packing_never_copies_the_cache_and_long_queries_go_to_transformers(monkeypatch):
    calls = []
    real = sdpa_attention.repeat_kv
    monkeypatch.setattr(sdpa_attention, "repeat_kv", lambda x, n: calls.append(n) or real(x, n))
    query, key, value, mask = inputs(4)
    grouped_sdpa(Grouped(3), query, key, value, mask, scaling=0.35)
    assert calls == []
    long_q, key, value, mask = inputs(PACKED_QUERIES + 1, keys=40)
    grouped_sdpa(Grouped(3), long_q, key, value, mask, scaling=0.35)
    assert calls == [3, 3]  # prefill-sized queries: transformers' own path, keys and values expanded


def test_decode_attention_switches_and_restores_the_config(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, attn_implementation="sdpa")
    with decode_attention(model.config, grouped=True):
        assert model.config._attn_implementation == NAME
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError):
        with decode_attention(model.config, grouped=True):
            raise RuntimeError("inside")
    assert model.config._attn_implementation == "sdpa"
    with decode_attention(model.config, grouped=False):  # MHA: nothing to pack
        assert model.config._attn_implementation == "sdpa"


def test_runtime_decode_steps_read_the_cache_without_copying_it(tiny_llama, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, attn_implementation="sdpa").eval()
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # the tiny models use GQA
    rt = Runtime(model, max_len=64)
    want = rt.generate([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]], max_new_tokens=6,
                       stop_ids=set()).tokens
    calls, packed = [], []
    real = sdpa_attention.repeat_kv
    monkeypatch.setattr(sdpa_attention, "repeat_kv", lambda x, n: calls.append(n) or real(x, n))

    def spy(module, query, *args, **kwargs):
        packed.append(query.shape[2])
        return grouped_sdpa(module, query, *args, **kwargs)

    monkeypatch.setattr(attention, "grouped_sdpa", spy)
    got = rt.generate([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]], max_new_tokens=6,
                      stop_ids=set()).tokens
    assert got == want
    # only the 17-token prefill expanded keys and values (once per layer); none of the 5 decode steps did,
    # and each of them went through the grouped function (transformers >= 5.23 packs plain decode too)
    assert len(calls) == 2 * model.config.num_hidden_layers
    assert packed.count(1) == 5 * model.config.num_hidden_layers
    assert model.config._attn_implementation == "sdpa"
