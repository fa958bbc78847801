"""A preallocated (static) KV cache that the model's own attention modules write into, and its masks.

Slots are positions: row b's token at slot s has position s - pad[b] (prompts are left-padded to a
common length). Rolling back a rejected speculative draft costs nothing: the caller only moves its
length back, since a slot is always rewritten before any query at or after it reads it.

Attention reads only the live part of the buffer: the first `live` slots, `live` rounded up to a
multiple of LIVE_BUCKET (`live_length`), so a decode step costs what the context costs, not what the
buffer holds, while a captured CUDA graph still sees one fixed shape per bucket.
"""

from __future__ import annotations

import torch

LIVE_BUCKET = 256  # slots: one captured graph per bucket, so a 2,048-slot cache needs at most 8


def live_length(needed: int, max_len: int, bucket: int = LIVE_BUCKET) -> int:
    """Slots attention reads when queries reach slot needed-1: `needed` rounded up to `bucket`, at most max_len."""
    return min(-(-needed // bucket) * bucket, max_len)


class StaticKVCache:
    """Keys/values for every layer, one [batch, kv_heads, max_len, head_dim] buffer each, written in place.

    One buffer per layer (not views of one tensor), as gpt-fast keeps them: under torch.compile each
    is its own graph input, so a cache write is one in-place scatter, never a copy of shared storage.

    It offers the one method HF attention modules call on a cache, `update(k, v, layer_idx)`: the new
    keys/values go to the slots in `self.slots` ([q], or [batch, q] per row; set by the runner before
    each forward) and the first `self.live` slots come back (every step of one bucket has the same
    shapes, which CUDA graphs need); the attention mask hides the slots a query may not see. A layer
    running fewer KV heads (a heads sub-network keeps whole query groups) uses the first heads of its
    buffer.
    """

    is_compileable = True  # read by transformers' compile heuristics; the shapes never change

    def __init__(self, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (batch, kv_heads, max_len, head_dim)
        self.layer_keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.layer_values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.kv_heads = kv_heads
        self.slots = torch.zeros(1, dtype=torch.long, device=device)  # [q] or [batch, q] slots the forward writes
        self.batch, self.max_len = batch, max_len
        self.live = max_len  # slots attention reads (set by the runner per call)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *_args, **_kwargs):
        """Write [batch, kv, q, head_dim] keys/values at `self.slots`; return [batch, kv, live, head_dim] views.

        `self.slots` [q] is one set of slots for every row; [batch, q] gives each row its own (batched
        speculation, where rows accept different numbers of drafted tokens). Either way every slot
        written must be below `self.live`, or attention would not read it back."""
        heads = key_states.shape[1]
        keys, values = self.layer_keys[layer_idx], self.layer_values[layer_idx]  # [batch, kv_heads, max_len, head_dim]
        if heads != self.kv_heads:  # a heads sub-network: its first KV heads
            keys, values = keys[:, :heads], values[:, :heads]
        if self.slots.dim() == 1:
            # Indexed assignment (index_put_): what torch.compile turns into one in-place scatter kernel.
            keys[:, :, self.slots] = key_states.to(keys.dtype)
            values[:, :, self.slots] = value_states.to(values.dtype)
        else:
            where = self.slots[:, None, :, None].expand_as(key_states)  # [batch, kv, q, head_dim]
            keys.scatter_(2, where, key_states.to(keys.dtype))
            values.scatter_(2, where, value_states.to(values.dtype))
        return keys[:, :, : self.live], values[:, :, : self.live]

    @property
    def keys(self) -> torch.Tensor:
        """A copy of every layer's keys, [layers, batch, kv_heads, max_len, head_dim] (for inspection)."""
        return torch.stack(self.layer_keys)

    @property
    def values(self) -> torch.Tensor:
        return torch.stack(self.layer_values)

    # transformers asks these of any cache object in some code paths; answer as a static cache would.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_len


class CacheSlot:
    """A cache as one layer sees it: every write and read goes to buffer `slot`, whatever layer index the
    layer passes. An exit's own decoder layer (exit_heads="layer") is a copy of a model layer and
    carries that layer's index; through this it uses a buffer of its own past the model's layers."""

    def __init__(self, cache: StaticKVCache, slot: int) -> None:
        self.cache, self.slot = cache, slot

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, _layer_idx: int, *args, **kwargs):
        return self.cache.update(key_states, value_states, self.slot, *args, **kwargs)

    def __getattr__(self, name: str):  # everything else (get_seq_length, is_compileable, ...) as the cache answers
        return getattr(self.cache, name)


def attention_masks(slots: torch.Tensor, pad: torch.Tensor, max_len: int, dtype: torch.dtype,
                    sliding_window: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Additive masks [batch, 1, q, max_len] (0 = attend, dtype-min = hidden) for queries at `slots`
    ([q] shared by every row, or [batch, q] per row).

    `max_len`: the key slots attention reads (the cache's live length). A query at slot s sees key
    slots k with pad[b] <= k <= s (causal, padding hidden); with a sliding window also s - k < window.
    The second mask is None without a window. Additive (not boolean) so that both the sdpa and the
    eager attention implementations accept it.
    """
    keys = torch.arange(max_len, device=slots.device)  # [max_len]
    query = slots[..., None]  # [q, 1] or [batch, q, 1]
    causal = keys <= query  # [q, max_len] or [batch, q, max_len]
    causal = causal if causal.dim() == 3 else causal[None]  # [1 or batch, q, max_len]
    visible = causal & (keys[None, None, :] >= pad[:, None, None])  # [batch, q, max_len]
    low = torch.finfo(dtype).min

    def additive(allowed: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros((), dtype=dtype, device=slots.device)
        return torch.where(allowed, zero, low)[:, None]  # [batch, 1, q, max_len]

    full = additive(visible)
    if sliding_window is None:
        return full, None
    in_window = query - keys < sliding_window  # [q, max_len] or [batch, q, max_len]
    in_window = in_window if in_window.dim() == 3 else in_window[None]  # [1 or batch, q, max_len]
    return full, additive(visible & in_window)


def position_ids(slots: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """Positions [batch, q] of the queries at `slots` ([q] or [batch, q]): slot minus the row's left
    padding (>= 0)."""
    rows = slots if slots.dim() == 2 else slots[None, :]  # [batch or 1, q]
    return (rows - pad[:, None]).clamp(min=0)  # [batch, q]


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [batch, longest] left-padded with pad_id, and each row's pad count [batch]."""
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (longest - len(p)) + list(p) for p in prompts], dtype=torch.long)
    pad = torch.tensor([longest - len(p) for p in prompts], dtype=torch.long)
    return ids.to(device), pad.to(device)
