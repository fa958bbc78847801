"""A preallocated (static) KV cache that the model's own attention modules write into, and its masks.

Slots are positions: row b's token at slot s has position s - pad[b] (prompts are left-padded to a
common length). Rolling back a rejected speculative draft costs nothing: the caller only moves its
length back, since a slot is always rewritten before any query at or after it reads it.
"""

from __future__ import annotations

import torch


class StaticKVCache:
    """Keys/values for every layer, [layers, batch, kv_heads, max_len, head_dim], written in place.

    It offers the one method HF attention modules call on a cache, `update(k, v, layer_idx)`: the new
    keys/values go to the slots in `self.slots` ([q], set by the runner before each forward) and the
    whole buffer comes back, so every step has the same shapes (what CUDA graphs need); the attention
    mask hides the slots a query may not see.
    """

    is_compileable = True  # read by transformers' compile heuristics; the shapes never change

    def __init__(self, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_layers, batch, kv_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)  # [layers, batch, kv_heads, max_len, head_dim]
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.slots = torch.zeros(1, dtype=torch.long, device=device)  # [q] or [batch, q] slots the forward writes
        self.batch, self.max_len = batch, max_len

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *_args, **_kwargs):
        """Write [batch, kv_heads, q, head_dim] keys/values at `self.slots`; return the full buffers.

        `self.slots` [q] is one set of slots for every row; [batch, q] gives each row its own (batched
        speculation, where rows accept different numbers of drafted tokens)."""
        keys, values = self.keys[layer_idx], self.values[layer_idx]  # [batch, kv_heads, max_len, head_dim]
        if self.slots.dim() == 1:
            keys.index_copy_(2, self.slots, key_states.to(keys.dtype))
            values.index_copy_(2, self.slots, value_states.to(values.dtype))
            return keys, values
        where = self.slots[:, None, :, None].expand_as(key_states)  # [batch, kv_heads, q, head_dim]
        keys.scatter_(2, where, key_states.to(keys.dtype))
        values.scatter_(2, where, value_states.to(values.dtype))
        return keys, values

    # transformers asks these of any cache object in some code paths; answer as a static cache would.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_len


def attention_masks(slots: torch.Tensor, pad: torch.Tensor, max_len: int, dtype: torch.dtype,
                    sliding_window: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Additive masks [batch, 1, q, max_len] (0 = attend, dtype-min = hidden) for queries at `slots`
    ([q] shared by every row, or [batch, q] per row).

    A query at slot s sees key slots k with pad[b] <= k <= s (causal, padding hidden); with a sliding
    window also s - k < window. The second mask is None without a window. Additive (not boolean) so that
    both the sdpa and the eager attention implementations accept it.
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
