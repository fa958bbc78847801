"""Run a contiguous range of decoder layers on a static KV cache, eagerly, compiled, or as a replayed CUDA graph.

Every call goes through the model's own modules, which the model's adapter hands over
(`ModelAdapter.decoder_stack`: embedding, positions, decoder layers, final norm + LM head, and for
width/heads adapters the plan slicing); only the cache and the masks are ours, and nothing here
names one architecture's attributes. A segment [start, end) is the unit that both plain decoding
(0..depth) and self-speculation (draft 0..n, verify n..depth) need.

The fused decode step (`compile_step`, used by `Runtime(fused=True)`) is the same call compiled
whole by torch.compile (norms, RoPE with the cache write, SwiGLU and residual adds fused by
Inductor) and, on CUDA, recorded as one CUDA graph per (segment, batch, plan, live-length bucket). Where the adapter offers
`DecoderStack.fused_layers` (the LLaMA layout does), the compiled step calls those decode forwards
instead of the HF layers (one GEMM for q/k/v, one for gate/up, over buffers the parameters are views
of); the eager path (prefill, CPU, unfused runtimes) keeps the model's own layers.
"""

from __future__ import annotations

import contextlib
import inspect
import time
import types
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from manyinone.core.errors import ManyinoneError
from manyinone.runtime.attention import decode_attention
from manyinone.runtime.cache import CacheSlot, StaticKVCache, attention_masks, live_length, position_ids

ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")  # both take an additive [batch, 1, q, keys] mask
RECOMPILE_LIMIT = 256  # compiled variants per step function: depths x batches x plans x live buckets
_STEPS = 0  # steps compiled so far (names their code objects)


def cache_argument(layer: nn.Module) -> str:
    """The keyword a decoder layer takes its cache under: `cache` (transformers >= 5.2x, where
    `past_key_values` is deprecated and goes in 5.40) or `past_key_values` (4.56 up to then)."""
    params = inspect.signature(layer.forward).parameters  # follows the deprecation wrapper's __wrapped__
    return "cache" if "cache" in params else "past_key_values"


def compile_step(fn: Callable, backend: str = "inductor", math_attention: bool = True, fullgraph: bool = False,
                 options: dict | None = None) -> Callable:
    """torch.compile for one whole decode step (static shapes: each bucket is its own graph, recorded
    once as a CUDA graph); raises dynamo's recompile limit so many (depth, batch, plan, bucket)
    variants never fall back to eager silently. `backend="aot_eager"` traces without code generation
    (a quick CPU check).

    math_attention: trace attention as its plain math (matmuls and a softmax) so that Inductor fuses the
    mask, softmax and GQA expansion into its own kernels, as gpt-fast does for decode; False keeps
    SDPA's fused kernels (benchmarks/decode_suite.py measures both). fullgraph: refuse any graph break
    (tests use it to prove a step traces whole, exit heads included). options: Inductor's config for this
    step (torch.compile's `options`; Inductor only), e.g. AUTOTUNE_GEMMS.
    """
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if isinstance(getattr(cfg, name, None), int) and getattr(cfg, name) < RECOMPILE_LIMIT:
            setattr(cfg, name, RECOMPILE_LIMIT)
    global _STEPS
    _STEPS += 1

    def traced(*args):
        return fn(*args)

    # A code object of its own per compiled step: dynamo caches compiled graphs per code object and does
    # not guard on the attention backend, so steps compiled with other settings must never share one.
    traced = types.FunctionType(traced.__code__.replace(co_name=f"decode_step_{_STEPS}"), traced.__globals__,
                                f"decode_step_{_STEPS}", None, traced.__closure__)
    extra = {"options": options} if options and backend == "inductor" else {}
    compiled = torch.compile(traced, backend=backend, dynamic=False, fullgraph=fullgraph, **extra)
    if not math_attention:
        return compiled
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def step(*args):
        with sdpa_kernel(SDPBackend.MATH):  # read when the step is traced; replays do not need it
            return compiled(*args)

    return step


# Inductor benchmarks its Triton GEMM templates against cuBLAS for every GEMM shape and keeps the faster.
# A batch-1 decode GEMV through cuBLAS can launch a split-K reduction kernel besides its own; a Triton
# template is one kernel and can take the neighbouring pointwise work as its epilogue. Measured in
# benchmarks/decode_suite.py ("runtime fused, autotuned GEMMs"); no CUDA graphs from Inductor: the
# runtime records its own.
AUTOTUNE_GEMMS = {"max_autotune": True, "coordinate_descent_tuning": True}


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
        self.model, self.parts, self.exit_logits, self.adapter = model, parts, exit_logits, adapter
        self.num_layers = len(parts.layers)
        self.cache_arg = cache_argument(parts.layers[0])
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
        heads = getattr(config, "num_attention_heads", None)
        self.grouped = isinstance(heads, int) and self.kv_heads < heads  # GQA: decode_attention packs the queries
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.fused: Sequence[Callable] | None = None  # the adapter's fused decode forwards, once `fuse` ran
        # Exits with a decoder layer of their own (exit_heads="layer"): each gets a KV-cache buffer past the
        # model's layers (`exit_slots`, through `CacheSlot`), and `run` calls it on the hidden state leaving its depth.
        self.exit_layers: dict[int, nn.Module] = dict(getattr(exit_logits, "layers", None) or {})
        self.exit_slots = {depth: self.num_layers + j for j, depth in enumerate(sorted(self.exit_layers))}
        self.cache_layers = self.num_layers + len(self.exit_layers)

    def fuse(self) -> None:
        """Opt in to the adapter's fused decode forwards (`DecoderStack.fused_layers`), which the compiled
        step then runs; the adapter may re-home weights as views of fused buffers (same values, no copy)."""
        if self.parts.fused_layers is not None:
            self.fused = self.parts.fused_layers()
            if len(self.fused) != self.num_layers:
                raise ManyinoneError(f"the {self.adapter.name!r} adapter gave {len(self.fused)} fused layers for "
                                     f"{self.num_layers} decoder layers")

    def check_fused(self) -> None:
        """Refuse to compile over fused buffers the parameters no longer view (moved or reloaded weights)."""
        shares = getattr(self.fused, "shares_storage", None)
        if shares is not None and not shares():
            raise ManyinoneError("the model's q/k/v or gate/up weights were moved or reloaded after the runtime fused "
                                 "them (e.g. model.to(), load_state_dict(assign=True)); build a new Runtime")

    def decode_attention(self) -> contextlib.AbstractContextManager[None]:
        """The block in which segment calls attend through `runtime.attention.grouped_sdpa` (GQA models
        on SDPA): the KV cache is read once per KV head instead of copied to every query head."""
        return decode_attention(self.model.config, self.grouped)

    def new_cache(self, batch: int, max_len: int) -> StaticKVCache:
        return StaticKVCache(self.cache_layers, batch, self.kv_heads, max_len, self.head_dim, self.dtype, self.device)

    def sliced(self, plan) -> contextlib.AbstractContextManager[None]:
        """Within the block the layers compute `plan` (a SubnetSpec of sizes per layer, bottom first) as views
        of the one copy of the weights; None: full size."""
        if plan is None:
            return contextlib.nullcontext()
        if self.parts.sliced is None:
            raise ManyinoneError(f"the {self.adapter.name!r} adapter serves depth only; a per-layer plan "
                                 "needs an adapter whose decoder stack slices plans (e.g. llama-flextron)")
        return self.parts.sliced(plan)

    def run(self, cache: StaticKVCache, start: int, end: int, inputs: torch.Tensor, slots: torch.Tensor,
            pad: torch.Tensor, head: bool, last_only: bool = False,
            live: int | None = None, layers: Sequence[Callable] | None = None,
            unit_masks: torch.Tensor | None = None,
            fill_exits: frozenset[int] = frozenset()) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Layers [start, end) on `inputs` (token ids [batch, q] if start == 0, else hidden [batch, q, hidden]).

        Writes keys/values of those layers at `slots` ([q], or [batch, q] for per-row slots); attention
        reads the first `live` cache slots (default all; every query slot of every row must be below it).
        Returns (hidden after layer end-1 [batch, q, hidden], float32 logits [batch, q or 1, vocab]
        through the final norm and head, or None). `layers`: forwards called instead of the decoder layers
        (the fused ones, `self.fused`), same signature; default the model's own. `unit_masks`: [batch, q or 1,
        layers, intermediate], each layer's MLP neurons scaled per row (only the fused forwards take it).

        Exit layers (`exit_layers`): the one at `end` runs when `head` (its exit's logits come after it), and
        those at the depths in `fill_exits` also run wherever the segment passes them, only to write their
        keys and values, so that a later draft from that exit finds them at every position (speculation
        names its draft exits there).
        """
        parts = self.parts
        layers = parts.layers if layers is None else layers
        cache.slots = slots
        cache.live = cache.max_len if live is None else live
        positions = position_ids(slots, pad)  # [batch, q]
        hidden = parts.embed(inputs, positions) if start == 0 else inputs  # [batch, q, hidden]
        rotary = parts.rotary(hidden, positions) if parts.rotary is not None else None  # (cos, sin) [batch, q, head_dim]
        full, sliding = attention_masks(slots, pad, cache.live, hidden.dtype, self.window)  # [batch, 1, q, live]
        exited = hidden
        for i in range(start, end):
            kwargs = {self.cache_arg: cache}
            if unit_masks is not None:
                kwargs["unit_mask"] = unit_masks[:, :, i]  # [batch, q or 1, intermediate]
            mask = sliding if self.sliding[i] else full
            out = layers[i](hidden, attention_mask=mask, position_ids=positions, use_cache=True,
                            position_embeddings=rotary, **kwargs)
            # transformers >= 5 returns a tensor from a decoder layer, older versions a tuple.
            hidden = out[0] if isinstance(out, tuple) else out
            exit_layer = self.exit_layers.get(i + 1)
            if exit_layer is not None and ((i + 1 == end and head) or i + 1 in fill_exits):
                slot = CacheSlot(cache, self.exit_slots[i + 1])
                out = exit_layer(hidden, attention_mask=mask, position_ids=positions, use_cache=True,
                                 position_embeddings=rotary, **{self.cache_arg: slot})
                exited = out[0] if isinstance(out, tuple) else out
        if not head:
            return hidden, None
        at_exit = exited if end in self.exit_layers else hidden  # the hidden state the exit's head reads
        return hidden, self.logits(end, at_exit[:, -1:] if last_only else at_exit)  # [batch, q or 1, vocab]

    def logits(self, depth: int, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits [..., vocab] of the exit at `depth` from hidden [..., hidden] (before the final norm)."""
        if self.exit_logits is not None:
            return self.exit_logits(depth, hidden).float()
        return self.parts.head(hidden).float()


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


class CompileLog:
    """Compiled step variants (one per segment, input shapes and live bucket) and the seconds their first
    calls took (tracing, code generation and CUDA-graph capture): what a benchmark reports apart from
    decode speed, and checks stays unchanged over its timed runs (nothing recompiles there)."""

    def __init__(self) -> None:
        self.compiles, self.seconds = 0, 0.0

    def admit(self, seen: set[tuple], shapes: tuple, step: tuple) -> None:
        """Record a new variant of one compiled step; refuse the one that would pass dynamo's recompile
        limit (past it dynamo silently runs the step eagerly, which no benchmark should time as fused)."""
        if len(seen) >= RECOMPILE_LIMIT:
            raise ManyinoneError(f"compiled decode step (start, end, head, live)={step} would be traced for a "
                                 f"{len(seen) + 1}th input shape {shapes[:2]}, over the recompile limit of "
                                 f"{RECOMPILE_LIMIT}; use fewer batch sizes, draft lengths or plans per runtime")
        seen.add(shapes)
        self.compiles += 1

    @staticmethod
    def clock(device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def snapshot(self) -> tuple[int, float]:
        return self.compiles, self.seconds


class SegmentRunner:
    """Runs segments of one `LayerStack` on one cache; with `graphs`, each (start, end, head, q, live, plan)
    shape once captured and then replayed, so a decode step costs one launch whatever the depth. With
    `compile_fn` (e.g. `compile_step`) each segment is compiled before it is recorded; `log` counts the
    compiled variants and the seconds their first calls took (shared by a runtime's runners)."""

    def __init__(self, stack: LayerStack, cache: StaticKVCache, graphs: bool, compile_fn: Callable | None = None,
                 log: "CompileLog | None" = None):
        self.stack, self.cache, self.graphs = stack, cache, graphs
        self.captured: dict[tuple, CapturedCall] = {}
        self.compiled: dict[tuple, Callable] = {}
        self.compile_fn = compile_fn
        self.log = log if log is not None else CompileLog()
        self.shapes: dict[tuple, set[tuple]] = {}  # compiled step -> input shapes it has been traced for
        # The draft exits with a layer of their own, while speculation runs (`drafting_from`): every call then
        # also fills those layers' caches (`LayerStack.run`).
        self.fill_exits: frozenset[int] = frozenset()

    def step_fn(self, start: int, end: int, head: bool, live: int | None = None) -> Callable:
        """The (compiled, if compile_fn) function of (inputs, slots, pad) one segment call runs."""
        fill = self.fill_exits
        if self.compile_fn is None:
            def segment(inputs, slots, pad):
                return self.stack.run(self.cache, start, end, inputs, slots, pad, head, live=live, fill_exits=fill)

            return segment
        fused = self.stack.fused  # compiled steps run the fused forwards where the adapter has them

        def segment(inputs, slots, pad):
            return self.stack.run(self.cache, start, end, inputs, slots, pad, head, live=live, layers=fused,
                                  fill_exits=fill)

        return self._compiled((start, end, head, live, fill), segment)

    @contextlib.contextmanager
    def drafting_from(self, exits: Sequence[int]) -> Iterator[None]:
        """Within the block every call also fills the caches of the own layers of `exits` (those that have
        one), so a draft from them finds keys at every position; restored on leaving."""
        previous = self.fill_exits
        self.fill_exits = frozenset(d for d in exits if d in self.stack.exit_layers)
        try:
            yield
        finally:
            self.fill_exits = previous

    def masked_step_fn(self, start: int, end: int, head: bool, live: int | None,
                       apply: Callable[[torch.Tensor], contextlib.AbstractContextManager]) -> Callable:
        """The function of (inputs, slots, pad, unit_masks) a per-row masked segment call runs: compiled
        over the fused forwards, which take the masks as an argument (a compiled function of its own:
        dynamo does not guard on module hooks, so hooks must never come and go around a shared one);
        otherwise the plain layers inside `apply(unit_masks)`, the adapter's mask hooks."""
        fused, fill = self.stack.fused, self.fill_exits
        if self.compile_fn is None or fused is None:
            def hooked(inputs, slots, pad, masks):
                with apply(masks):
                    return self.stack.run(self.cache, start, end, inputs, slots, pad, head, live=live, fill_exits=fill)

            return hooked

        def segment(inputs, slots, pad, masks):
            return self.stack.run(self.cache, start, end, inputs, slots, pad, head, live=live, layers=fused,
                                  unit_masks=masks, fill_exits=fill)

        return self._compiled((start, end, head, live, fill, "masked"), segment)

    def _compiled(self, key: tuple, segment: Callable) -> Callable:
        """compile_fn(segment), once per key: each key is its own compiled function (code object)."""
        if key not in self.compiled:
            self.compiled[key] = self.compile_fn(segment)
        return self.compiled[key]

    def _fn(self, start: int, end: int, head: bool) -> Callable:  # the earlier name, kept for callers of it
        return self.step_fn(start, end, head)

    def live_for(self, slots_end: int | None) -> int | None:
        """The live-length bucket for queries below slot `slots_end` (None: the whole cache)."""
        return None if slots_end is None else live_length(slots_end, self.cache.max_len)

    def __call__(self, start: int, end: int, inputs: torch.Tensor, slots: torch.Tensor, pad: torch.Tensor,
                 head: bool = True, slots_end: int | None = None, plan=None,
                 masked: tuple[Callable[[torch.Tensor], contextlib.AbstractContextManager], torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One decode-shaped call (small q); see `LayerStack.run`. `slots_end`: one past the last query slot
        (of the furthest row, for per-row slots), when the caller knows it (attention then reads only the live bucket; default the whole cache).
        `plan`: the per-layer sizes (SubnetSpecs) of a sliced sub-network (None: full size).
        `masked`: (apply, unit_masks): the token router's per-row MLP-neuron masks over a union plan
        ([batch, 1, layers, intermediate]; `apply` the adapter's `masked` for the unfused path), an input
        like the others, so a recorded graph reads each call's masks (`masked_step_fn`).
        Prefill goes through `prefill`."""
        live, fill = self.live_for(slots_end), self.fill_exits
        mask_shape = None if masked is None else tuple(masked[1].shape)
        shapes = (tuple(inputs.shape), tuple(slots.shape), plan, mask_shape)  # [q] and per-row [batch, q] slots differ
        # A masked step compiles only over fused forwards (masked_step_fn); otherwise it runs eagerly.
        compiled = self.compile_fn is not None and (masked is None or self.stack.fused is not None)
        fresh = compiled and shapes not in self.shapes.get((start, end, head, live, fill), ())
        if fresh:  # a new compiled variant: count it and time it apart from decoding
            self.log.admit(self.shapes.setdefault((start, end, head, live, fill), set()), shapes,
                           (start, end, head, live))
            self.stack.check_fused()
            begin = self.log.clock(inputs.device)
        if masked is None:
            fn, args = self.step_fn(start, end, head, live), [inputs, slots, pad]
        else:
            fn, args = self.masked_step_fn(start, end, head, live, masked[0]), [inputs, slots, pad, masked[1]]
        if not self.graphs:
            with self.stack.sliced(plan), self.stack.decode_attention():
                out = fn(*args)
        else:
            key = (start, end, head, *shapes[:2], live, plan, mask_shape, fill)
            call = self.captured.get(key)
            if call is None:
                # The plan's views exist only inside `sliced`: the graph records their addresses (views of
                # the one copy of the weights), so replays need no slicing.
                with self.stack.sliced(plan), self.stack.decode_attention():
                    call = self.captured[key] = CapturedCall(fn, args)
            out = call(*args)
        if fresh:
            self.log.seconds += self.log.clock(inputs.device) - begin
        return out

    def prefill(self, end: int, ids: torch.Tensor, pad: torch.Tensor, plan=None) -> torch.Tensor:
        """Layers [0, end) on whole prompts ids [batch, prompt] at slots 0..prompt-1, eagerly (one call per
        request); returns float32 logits of the last position [batch, 1, vocab]."""
        slots = torch.arange(ids.shape[1], device=ids.device)  # [prompt]
        with self.stack.sliced(plan), self.stack.decode_attention():
            _, logits = self.stack.run(self.cache, 0, end, ids, slots, pad, head=True, last_only=True,
                                       live=self.live_for(ids.shape[1]), fill_exits=self.fill_exits)
        return logits
