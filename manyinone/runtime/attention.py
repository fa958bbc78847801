"""Decode attention for grouped KV heads (GQA) that reads each KV head once for its whole query group.

transformers' SDPA path expands the keys and values to every query head (`repeat_kv`) whenever a mask
is passed, and the runtime always passes one (left padding, live cache length). For a model with 3 KV
heads and 9 query heads, every decode step then copies the whole live cache 3x per layer before
attention reads it again: 41% of `manyinone distill-data`'s GPU time on SmolLM2 at batch 1,024
(benchmarks/RESULTS.md, the sampler profile). Here the few queries of a decode or verify step are
packed instead: a query head h = kv * groups + g (repeat_kv's order) becomes row g * q + t of its KV
head, so SDPA runs on [batch, kv_heads, groups * q, head_dim] against the cache as it is, with the
mask repeated per group (a few rows): SDPA itself, with no copy of the cache. Longer queries
(prefill), models without grouping and anything unusual go to transformers' own SDPA function.

Used only inside the runtime's segment calls (`decode_attention`), so training and every other caller
of the model keep their configured attention.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.nn import functional as F

NAME = "manyinone_grouped_sdpa"
PACKED_QUERIES = 16  # at most this many query positions are packed (decode: 1, a verify pass: the draft + 1)


def grouped_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                 **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [batch, heads, q, d], key/value [batch, kv, keys, d],
    an additive or boolean mask [batch, 1, q, keys]; returns ([batch, q, heads, d], None)."""
    batch, heads, q, dim = query.shape
    kv = key.shape[1]
    groups = heads // kv
    plain = (groups == 1 or heads % kv or q > PACKED_QUERIES or attention_mask is None or dropout > 0
             or attention_mask.dim() != 4 or attention_mask.shape[1] != 1 or kwargs.get("softcap") is not None
             or kwargs.get("output_attentions") or key.shape[-1] != value.shape[-1])
    if plain:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    packed = query.reshape(batch, kv, groups * q, dim)  # row g * q + t: head kv * groups + g, query t
    mask = attention_mask if q == 1 else attention_mask.repeat(1, 1, groups, 1)  # [batch, 1, groups * q, keys]
    out = F.scaled_dot_product_attention(packed, key, value, attn_mask=mask, dropout_p=0.0, scale=scaling)
    return out.reshape(batch, heads, q, dim).transpose(1, 2).contiguous(), None  # [batch, q, heads, d]


@contextlib.contextmanager
def decode_attention(config, grouped: bool) -> Iterator[None]:
    """Within the block a model configured for "sdpa" attends through `grouped_sdpa` (when its KV heads
    are `grouped`); its configuration is restored on leaving, whatever happens inside."""
    if not grouped or getattr(config, "_attn_implementation", None) != "sdpa":
        yield
        return
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, grouped_sdpa)  # a dict entry: cheap to set on every entry
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"
