"""Generation from one loaded model at any budget per call: static KV cache, CUDA graphs, batching.

A budget picks a sub-network from the checkpoint's index: a depth, and with per-layer axes (width,
heads) a plan (a SubnetSpec of sizes per layer) that runs as views of the one copy of the weights
(`LayerStack.sliced`).
`fused=True` compiles each whole decode step (`stack.compile_step`) before recording its CUDA graph;
a fused runtime opts the model in to its adapter's fused decode forwards (`LayerStack.fuse`: for the
LLaMA layout, q/k/v and gate/up each one GEMM over one buffer, the parameters made views of it, so
the model keeps the same values and memory; `manyinone_llama.fused.FusedLayers.restore` undoes it).

Example:
    >>> rt = Runtime.open("runs/x")
    >>> out = rt.generate([rt.encode("Name three primes.")], budget=0.5, max_new_tokens=32)
    >>> rt.decode(out.tokens[0])
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from manyinone.io.checkpoint import resolve, routed_plan
from manyinone.core.adapter import PlanAdapter
from manyinone.core.axes import PAIR_AXES, LayerPlan, axis_order
from manyinone.core.space import SubnetSpec
from manyinone.core.errors import ManyinoneError
from manyinone.runtime.cache import left_pad  # noqa: F401  (re-exported: part of this module's API)
from manyinone.runtime.exit_logits import ExitLogits
from manyinone.runtime.sampling import Sampling, choose, step_output
from manyinone.runtime.stack import CompileLog, LayerStack, SegmentRunner, compile_step

DEFAULT_MAX_LEN = 2048
DEFAULT_MAX_CACHE_MIB = 4096.0  # KV caches kept at once, all batch sizes together


class OverLimit(ManyinoneError):
    """A request over a configured resource limit (rows per batch, KV-cache memory): the server's 413."""


@dataclass
class Generation:
    """New tokens per row (stop token excluded), why each row ended, and where the time went.

    prefill_s covers the prompt forward and the first token; decode_s every later token.
    """

    tokens: list[list[int]]
    finish: list[str]  # "stop" (a stop token) or "length" (max_new_tokens)
    depth: int
    prefill_s: float = 0.0
    decode_s: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def decode_tokens_per_s(self) -> float:
        later = sum(max(len(t) - 1, 0) for t in self.tokens)
        return later / self.decode_s if self.decode_s > 0 else 0.0


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_named(name: str) -> torch.dtype:
    """The weights dtype for a CLI/server `--dtype` value."""
    if name not in DTYPES:
        raise ManyinoneError(f"dtype {name!r} unknown; allowed {list(DTYPES)}")
    return DTYPES[name]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runtime:
    """One model in memory; each call picks its depth (budget), sampling, batch and speculation.

    graphs: record each decode step shape as a CUDA graph (default: on CUDA); `compile_fn` (e.g.
    `torch.compile`) is applied to a segment before it is recorded; `fused=True` is compile_fn=
    `compile_step` (the whole step compiled, static shapes). Not thread-safe: one call at a time
    (the server serialises requests).

    Memory: a KV cache (and its graphs) is kept per batch size for reuse, least recently used ones freed
    so that all of them together stay within `max_cache_mib`; a call needing more, or more rows than
    `max_batch` (None: no cap), is refused with OverLimit before anything is allocated.
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, index: dict[str, Any] | None = None,
                 max_len: int | None = None, graphs: bool | None = None, compile_fn=None,
                 exit_logits=None, adapter=None, max_batch: int | None = None,
                 max_cache_mib: float = DEFAULT_MAX_CACHE_MIB, fused: bool = False, token_router=None) -> None:
        self.model, self.tokenizer, self.index = model.eval(), tokenizer, index
        self.token_router = token_router  # a TokenRouter when the index has token-routed budgets
        self.stack = LayerStack(model, exit_logits, adapter)
        axes = list((index or {}).get("space") or {})
        if any(a != "depth" for a in axes) and self.stack.parts.sliced is None:
            raise ManyinoneError(f"this checkpoint nests {axes}, but the {self.stack.adapter.name!r} adapter's "
                                 "decoder stack serves depth only; open it with an adapter that slices "
                                 "per-layer plans, or export a budget and serve that plain model")
        self.device = self.stack.device
        self.graphs = (self.device.type == "cuda") if graphs is None else graphs
        if self.graphs and self.device.type != "cuda":
            raise ManyinoneError("CUDA graphs need a CUDA device; this model is on "
                                 f"{self.device.type} (use graphs=False)")
        limit = getattr(model.config, "max_position_embeddings", None) or DEFAULT_MAX_LEN
        self.max_len = int(max_len or min(limit, DEFAULT_MAX_LEN))
        self.compile_fn = compile_step if fused and compile_fn is None else compile_fn
        self.fused = self.compile_fn is not None
        if self.fused:  # the opt-in: q/k/v and gate/up re-homed as views of fused buffers (same values)
            self.stack.fuse()
        # Compiled steps: every (segment, input shapes, live bucket) is traced once; the log counts them.
        self.compile_log = CompileLog()
        # Tokens every speculative verify pass is padded to (None: the policy's longest draft when the steps
        # are compiled, the drafted tokens when not): one compiled verify graph per exit for every length.
        self.verify_width: int | None = None
        if max_batch is not None and max_batch < 1:
            raise ManyinoneError(f"max_batch {max_batch} out of range; allowed >= 1")
        if not max_cache_mib > 0:
            raise ManyinoneError(f"max_cache_mib {max_cache_mib!r} out of range; allowed > 0")
        self.max_batch, self.max_cache_bytes = max_batch, int(max_cache_mib * 2**20)
        if self.cache_bytes(1) > self.max_cache_bytes:
            raise ManyinoneError(f"a context of {self.max_len} tokens needs {self.cache_bytes(1) / 2**20:,.1f} MiB of "
                                 f"KV cache per row, over the limit of {max_cache_mib:g} MiB; lower max_len or raise "
                                 "max_cache_mib")
        self._runners: OrderedDict[int, SegmentRunner] = OrderedDict()  # least recently used first
        self._slots = torch.arange(self.max_len, device=self.device)  # views of it serve as slot inputs

    @classmethod
    def open(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "auto",
             **kwargs: Any) -> "Runtime":
        """A runtime over a manyinone checkpoint folder (any budget it indexes)."""
        from manyinone.io.api import open_checkpoint
        from manyinone.core.device import pick_device

        return cls.from_nested(open_checkpoint(path, dtype=dtype, device=str(pick_device(device))), **kwargs)

    @classmethod
    def from_nested(cls, nested, **kwargs: Any) -> "Runtime":
        """A runtime over an opened checkpoint (`manyinone.io.api.NestedModel`), its per-exit heads included."""
        # Per-exit modules: each depth exits through its own, resolved now into modules (never built
        # inside a compiled step's trace).
        exit_logits = ExitLogits.of(nested) if nested.exit_heads is not None else None
        return cls(nested.model, nested.tokenizer, nested.index, exit_logits=exit_logits, adapter=nested.adapter,
                   token_router=nested.token_router, **kwargs)

    # --- budgets ----------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.stack.num_layers

    def exits(self) -> list[int]:
        """Depths this model was trained to exit at (all depths for a plain model)."""
        if self.index is None:
            return [self.num_layers]
        return sorted({e["spec"]["depth"] for e in self.index["specs"]})

    def depth_for(self, budget: float | None) -> int:
        """Decoder layers to run for `budget` (fraction of the full cost; None = all)."""
        return self.target(budget)[0]

    def token_routing(self, budget: float | None):
        """The token routing (`manyinone.elastic.token_router.TokenRouting`) serving `budget`, or None
        when the checkpoint does not route `budget` per token."""
        if self.index is None or not self.index.get("token_routed"):
            return None
        from manyinone.elastic.token_router_io import routing_for

        return routing_for(self, budget)

    def target(self, budget: float | None = None, spec=None) -> tuple[int, LayerPlan | None]:
        """(depth, plan) of the sub-network to run: `spec` (a SubnetSpec or mapping, e.g. {"depth": 16,
        "width": 5504}) if given, else the budget's spec in the index (or its stored routed plan). plan:
        one SubnetSpec of per-layer sizes per layer, bottom first, or None when every layer runs at full size."""
        if spec is None:
            if self.index is None:
                if budget not in (None, 1, 1.0):
                    raise ManyinoneError(f"budget {budget!r} needs a manyinone checkpoint; this plain model allows "
                                         "only the full budget (1)")
                return self.num_layers, None
            routing = self.token_routing(budget)
            if routing is not None:  # per token; the union of its plans is what a pass over mixed tokens slices
                return self.num_layers, self._plan(routing.union)
            routed = routed_plan(self.index, budget) if self.stack.parts.sliced is not None else None
            if routed is not None:
                return len(routed), self._plan(routed)
            spec = resolve(self.index, budget)
        spec = dict(spec)
        adapter = self.stack.adapter
        layer_axes = adapter.layer_axes if isinstance(adapter, PlanAdapter) else {}
        # The built-in axis names are always known here, so a spec slicing width on a depth-only
        # adapter gets the "serves depth only" line below rather than "unknown axis".
        known = {"depth", *PAIR_AXES, *layer_axes}
        unknown = sorted(set(spec) - known)
        if unknown:
            allowed = ", ".join(("depth", *axis_order(known - {"depth"})))
            raise ManyinoneError(f"spec axes {unknown} unknown to the runtime; allowed {allowed}")
        depth = int(spec.get("depth", self.num_layers))
        if not 1 <= depth <= self.num_layers:
            raise ManyinoneError(f"depth={depth} out of range; allowed 1..{self.num_layers}")
        if not set(spec) - {"depth"}:
            return depth, None
        if self.stack.parts.sliced is None or not layer_axes:
            raise ManyinoneError(f"spec {spec} slices {'/'.join(sorted(set(spec) - {'depth'}))}, but the {adapter.name!r} "
                                 "adapter serves depth only; use an adapter with per-layer plans (e.g. llama-flextron)")
        return depth, self._plan(adapter.plan({**spec, "depth": depth}))

    def _plan(self, plan) -> LayerPlan | None:
        """A checked plan, or None when every layer is at full size (the plain, unsliced path)."""
        adapter = self.stack.adapter
        plan = adapter.check_plan(plan)
        full = SubnetSpec({name: axis.total for name, axis in adapter.layer_axes.items()})
        return None if all(o == full for o in plan) else plan

    # --- text helpers -----------------------------------------------------------------------
    def encode(self, text: str, template: str = "raw") -> list[int]:
        """Token ids of `text` as training tokenized prompts (`train.data.encode_text`): "chat" for a
        chat-template text (its special tokens are already in it), anything else for plain text."""
        from manyinone.train.data import encode_text

        return encode_text(self.tokenizer, text, template)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def default_stop_ids(self) -> set[int]:
        eos = getattr(self.model.generation_config, "eos_token_id", None) or getattr(self.model.config, "eos_token_id", None)
        eos = eos if isinstance(eos, list) else [eos]
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.append(self.tokenizer.eos_token_id)
        return {int(e) for e in eos if e is not None}

    # --- generation ---------------------------------------------------------------------------
    def cache_bytes(self, batch: int) -> int:
        """Bytes of the KV cache (keys and values) for `batch` rows at this runtime's context length."""
        st = self.stack
        return 2 * st.cache_layers * batch * st.kv_heads * self._cache_len() * st.head_dim * st.dtype.itemsize

    def rows_within_cache(self, most: int) -> int:
        """The most batch rows (up to `most`, at least 1) whose KV cache stays within max_cache_mib."""
        return max(1, min(most, self.max_cache_bytes // self.cache_bytes(1)))

    def fit_batch(self, batch: int) -> "Runtime":
        """Raise the cache limit (max_cache_mib) to hold `batch` rows at this context, for a job sized to
        its own work (an evaluation, a sampling run) rather than a server with a memory cap to keep."""
        self.max_cache_bytes = max(self.max_cache_bytes, self.cache_bytes(batch))
        return self

    def _cache_len(self) -> int:
        return -(-self.max_len // 16) * 16  # a multiple of 16: what fused attention kernels want for an explicit mask

    def runner(self, batch: int) -> SegmentRunner:
        """The segment runner (and KV cache) for `batch` rows; kept for reuse (captured graphs included)
        while all kept caches fit in max_cache_mib, the least recently used freed first."""
        if batch in self._runners:
            self._runners.move_to_end(batch)
            return self._runners[batch]
        need = self.cache_bytes(batch)
        if need > self.max_cache_bytes:
            raise OverLimit(f"{batch} rows need {need / 2**20:,.1f} MiB of KV cache, over the limit of "
                            f"{self.max_cache_bytes / 2**20:g} MiB (max_cache_mib); send fewer prompts at once")
        while self._runners and sum(map(self.cache_bytes, self._runners)) + need > self.max_cache_bytes:
            self._runners.popitem(last=False)  # its cache and graphs are freed with it
        cache = self.stack.new_cache(batch, self._cache_len())
        self._runners[batch] = SegmentRunner(self.stack, cache, self.graphs, self.compile_fn, self.compile_log)
        return self._runners[batch]

    def check_request(self, prompts: list[list[int]], max_new_tokens: int, extra: int = 0) -> None:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ManyinoneError("every prompt needs at least one token")
        if self.max_batch is not None and len(prompts) > self.max_batch:
            raise OverLimit(f"{len(prompts)} prompts in one request exceed the limit of {self.max_batch} "
                            "(max_batch); send fewer prompts at once")
        if self.cache_bytes(len(prompts)) > self.max_cache_bytes:
            raise OverLimit(f"{len(prompts)} prompts need {self.cache_bytes(len(prompts)) / 2**20:,.1f} MiB of KV "
                            f"cache, over the limit of {self.max_cache_bytes / 2**20:g} MiB (max_cache_mib); "
                            "send fewer prompts at once")
        if max_new_tokens < 1:
            raise ManyinoneError(f"max_new_tokens {max_new_tokens} out of range; allowed >= 1")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens + extra > self.max_len:
            raise ManyinoneError(
                f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the context limit of "
                f"{self.max_len - extra} tokens; shorten the prompt or lower max_tokens")

    def stream(self, prompts: list[list[int]], budget: float | None = None, max_new_tokens: int = 64,
               sampling: Sampling = Sampling(), stop_ids: set[int] | None = None,
               stats: dict[str, Any] | None = None, spec=None) -> Iterator[list[list[int]]]:
        """Plain decoding, all rows together: yields each step's new tokens per row ([] once a row stopped).
        `spec`: an explicit sub-network instead of the budget's (see `target`). A token-routed budget
        runs each token on its router's plan (`runtime.token_routed`)."""
        routing = self.token_routing(budget) if spec is None else None
        if routing is not None:
            from manyinone.runtime.token_routed import token_routed_stream

            yield from token_routed_stream(self, prompts, routing, max_new_tokens, sampling, stop_ids, stats)
            return
        depth, plan = self.target(budget, spec)
        self.check_request(prompts, max_new_tokens)
        stop = self.default_stop_ids() if stop_ids is None else stop_ids
        runner = self.runner(len(prompts))
        pad_id = int(getattr(self.model.config, "pad_token_id", None) or 0)
        generator = torch.Generator(self.device).manual_seed(sampling.seed)
        with torch.no_grad():
            ids, pad = left_pad(prompts, pad_id, self.device)
            logits = runner.prefill(depth, ids, pad, plan)  # [batch, 1, vocab]
            token = choose(logits[:, -1], sampling, generator)  # [batch]
            slot, live = ids.shape[1], [True] * len(prompts)
            cuda = self.device.type == "cuda"
            host = torch.empty(len(prompts), dtype=torch.long, pin_memory=cuda)
            for step in range(max_new_tokens):
                if cuda:  # read this token while the GPU already computes the next one
                    host.copy_(token, non_blocking=True)
                    ready = torch.cuda.Event()
                    ready.record()
                if step < max_new_tokens - 1:
                    _, logits = runner(0, depth, token[:, None], self._slots[slot: slot + 1], pad,
                                       slots_end=slot + 1, plan=plan)
                    following = choose(logits[:, -1], sampling, generator)  # [batch]
                if cuda:
                    ready.synchronize()
                chosen = (host if cuda else token).tolist()  # the one CPU-GPU sync per step
                yield step_output(chosen, live, stop)
                if step == max_new_tokens - 1 or not any(live):
                    break
                token, slot = following, slot + 1
        if stats is not None:
            stats.update(depth=depth, steps=step + 1, **({"plan": [list(o) for o in plan]} if plan else {}))

    def generate(self, prompts: list[list[int]], budget: float | None = None, max_new_tokens: int = 64,
                 sampling: Sampling = Sampling(), stop_ids: set[int] | None = None, speculative: bool = False,
                 draft_depth: int | None = None, draft_tokens: int | None = None,
                 draft_threshold: float | None = None, adaptive_draft: bool | None = None,
                 spec=None) -> Generation:
        """Generate for every prompt (token ids); `speculative` drafts with the first layers and verifies
        with the rest (all rows together, each at its own position), giving the same tokens as plain
        decoding when greedy. Draft settings: see `runtime.draft_policy.plan_for`.
        `spec`: an explicit sub-network instead of the budget's (see `target`)."""
        stats: dict[str, Any] = {}
        depth, plan = self.target(budget, spec)
        if speculative and (plan is not None or spec is not None):
            raise ManyinoneError("speculative decoding serves depth budgets of the full width; this request runs a "
                                 "(width, heads) plan or an explicit spec: set speculative false")
        if speculative:
            from manyinone.runtime.speculative import speculative_batch_stream

            streams = [speculative_batch_stream(self, prompts, budget, max_new_tokens, sampling, stop_ids, draft_depth,
                                                draft_tokens, stats, draft_threshold, adaptive_draft)]
        else:
            streams = [self.stream(prompts, budget, max_new_tokens, sampling, stop_ids, stats, spec)]
        tokens: list[list[int]] = [[] for _ in prompts]
        prefill_s = decode_s = 0.0
        row0 = 0
        for stream in streams:
            start = time.perf_counter()
            first = True
            for step in stream:
                for i, new in enumerate(step):
                    tokens[row0 + i].extend(new)
                if first:  # the prompt forward and the first token
                    synchronize(self.device)
                    now = time.perf_counter()
                    prefill_s, start, first = prefill_s + now - start, now, False
            synchronize(self.device)
            decode_s += time.perf_counter() - start
            row0 += len(step)
        finish = ["stop" if len(t) < max_new_tokens else "length" for t in tokens]
        return Generation(tokens, finish, stats.get("depth", depth), prefill_s, decode_s, stats)
