"""Run a contiguous range of decoder layers on a static KV cache, eagerly or as a replayed CUDA graph.

Every call goes through the model's own modules, which the model's adapter hands over
(`ModelAdapter.decoder_stack`: embedding, positions, decoder layers, final norm + LM head); only the
cache and the masks are ours, and nothing here names one architecture's attributes. A segment
[start, end) is the unit that both plain decoding (0..depth) and self-speculation (draft 0..n,
verify n..depth) need.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from manyinone.core.errors import ManyinoneError
from manyinone.runtime.cache import StaticKVCache, attention_masks, position_ids

ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")  # both take an additive [batch, 1, q, keys] mask


class LayerStack:
    """The decoder stack of one causal LM as its adapter hands it over, plus which layers slide their window."""

    def __init__(self, model: nn.Module, exit_logits: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
                 adapter=None) -> None:
        """`exit_logits(depth, hidden)`: logits of an exit with its own modules (per-exit heads); default the
        model's own final norm and LM head, shared by every exit (SoFT). `adapter`: the model's adapter
        (default: the registered one for its model_type)."""
        if adapter is None:
            from manyinone.core.registry import adapter_for

            adapter = adapter_for(model)
        parts = adapter.decoder_stack()
        config = model.config
        attn = getattr(config, "_attn_implementation", None) or "sdpa"
        if attn not in ATTENTION_IMPLEMENTATIONS:
            raise ManyinoneError(f"attention implementation {attn!r} unsupported by the runtime; "
                                 f"allowed {list(ATTENTION_IMPLEMENTATIONS)}")
        self.model, self.parts, self.exit_logits = model, parts, exit_logits
        self.num_layers = len(parts.layers)
        self.window = getattr(config, "sliding_window", None)
        types = getattr(config, "layer_types", None)
        if self.window is None:
            self.sliding = [False] * self.num_layers
        elif isinstance(types, list):
            self.sliding = [t == "sliding_attention" for t in types[: self.num_layers]]
        else:  # mistral: one window for every layer
            self.sliding = [True] * self.num_layers
        if not any(self.sliding):
            self.window = None
        self.head_dim, self.kv_heads = parts.head_dim, parts.kv_heads
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device

    def new_cache(self, batch: int, max_len: int) -> StaticKVCache:
        return StaticKVCache(self.num_layers, batch, self.kv_heads, max_len, self.head_dim, self.dtype, self.device)

    def run(self, cache: StaticKVCache, start: int, end: int, inputs: torch.Tensor, slots: torch.Tensor,
            pad: torch.Tensor, head: bool, last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Layers [start, end) on `inputs` (token ids [batch, q] if start == 0, else hidden [batch, q, hidden]).

        Writes keys/values of those layers at `slots` ([q], or [batch, q] for per-row slots) and returns
        (hidden after layer end-1 [batch, q, hidden], float32 logits [batch, q or 1, vocab] through the
        final norm and head, or None).
        """
        parts = self.parts
        cache.slots = slots
        positions = position_ids(slots, pad)  # [batch, q]
        hidden = parts.embed(inputs, positions) if start == 0 else inputs  # [batch, q, hidden]
        rotary = parts.rotary(hidden, positions) if parts.rotary is not None else None  # (cos, sin) [batch, q, head_dim]
        full, sliding = attention_masks(slots, pad, cache.max_len, hidden.dtype, self.window)
        for i in range(start, end):
            out = parts.layers[i](hidden, attention_mask=sliding if self.sliding[i] else full,
                                 position_ids=positions, past_key_values=cache, use_cache=True,
                                 position_embeddings=rotary)
            # transformers >= 5 returns a tensor from a decoder layer, older versions a tuple.
            hidden = out[0] if isinstance(out, tuple) else out
        if not head:
            return hidden, None
        out = hidden[:, -1:] if last_only else hidden
        if self.exit_logits is not None:
            return hidden, self.exit_logits(end, out).float()  # [batch, q or 1, vocab]
        return hidden, parts.head(out).float()


class CapturedCall:
    """A function of fixed-shape tensors recorded once as a CUDA graph; each call copies inputs in and replays.

    The first call warms up on a side stream with the real inputs, then captures. Warm-up runs have
    the same side effects as the real call (they write the same keys/values to the same slots), so they
    are harmless. Outputs are static buffers: read or copy them before the next call.
    """

    def __init__(self, fn: Callable[..., tuple], inputs: list[torch.Tensor]) -> None:
        self.inputs = [x.clone() for x in inputs]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # lets lazy inits (cuBLAS handles, compiled kernels) happen outside capture
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = fn(*self.inputs)

    def __call__(self, *inputs: torch.Tensor) -> tuple:
        for static, x in zip(self.inputs, inputs):
            static.copy_(x)
        self.graph.replay()
        return self.outputs


class SegmentRunner:
    """Runs segments of one `LayerStack` on one cache; with `graphs`, each (start, end, head, q) shape once
    captured and then replayed, so a decode step costs one launch whatever the depth."""

    def __init__(self, stack: LayerStack, cache: StaticKVCache, graphs: bool, compile_fn: Callable | None = None):
        self.stack, self.cache, self.graphs = stack, cache, graphs
        self.captured: dict[tuple, CapturedCall] = {}
        self.compiled: dict[tuple, Callable] = {}
        self.compile_fn = compile_fn

    def _fn(self, start: int, end: int, head: bool) -> Callable:
        def segment(inputs, slots, pad):
            return self.stack.run(self.cache, start, end, inputs, slots, pad, head)

        if self.compile_fn is None:
            return segment
        key = (start, end, head)
        if key not in self.compiled:
            self.compiled[key] = self.compile_fn(segment)
        return self.compiled[key]

    def __call__(self, start: int, end: int, inputs: torch.Tensor, slots: torch.Tensor, pad: torch.Tensor,
                 head: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One decode-shaped call (small q); see `LayerStack.run`. Prefill goes through `prefill`."""
        if not self.graphs:
            return self.stack.run(self.cache, start, end, inputs, slots, pad, head)
        key = (start, end, head, tuple(inputs.shape), tuple(slots.shape))  # [q] and per-row [batch, q] slots differ
        call = self.captured.get(key)
        if call is None:
            call = self.captured[key] = CapturedCall(self._fn(start, end, head), [inputs, slots, pad])
        return call(inputs, slots, pad)

    def prefill(self, end: int, ids: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """Layers [0, end) on whole prompts ids [batch, prompt] at slots 0..prompt-1, eagerly (one call per
        request); returns float32 logits of the last position [batch, 1, vocab]."""
        slots = torch.arange(ids.shape[1], device=ids.device)  # [prompt]
        _, logits = self.stack.run(self.cache, 0, end, ids, slots, pad, head=True, last_only=True)
        return logits
