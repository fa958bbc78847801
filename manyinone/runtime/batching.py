"""Continuous batching across budgets: requests at different depths share one batch of KV-cache rows.

Every decode step runs the batch's rows together through the layers up to the deepest row's depth,
in segments between the rows' distinct depths; a row takes its logits at its own depth (the layers
past it change nothing it reads). New requests join between steps and finished ones leave.

One slot counter serves the whole batch (the cache and masks stay as `runtime.stack` has them): a
request joining when the batch stands at slot S has its prompt at slots [S - len, S), i.e. a left
padding of S - len, prefilled alone in a one-row scratch cache (the very call a request served alone
makes) and copied into its row. A prompt longer than S waits until S reaches it; once the counter
cannot fit a waiting request's answer, no one joins until the batch drains and the counter restarts.
Rows of a per-layer plan (width, heads, ...) batch only with rows of the same plan (the weights they run differ).
"""

from __future__ import annotations

import collections
import queue
import threading
from dataclasses import dataclass, field

import torch

from manyinone.core.errors import ManyinoneError
from manyinone.runtime.sampling import Sampling, choose
from manyinone.runtime.stack import SegmentRunner


@dataclass(eq=False)
class BatchRequest:
    """One prompt in the batch. `events` receives ("tokens", [ids]) per step, then ("done", finish) or
    ("error", message); setting `cancel` makes it leave before the next step."""

    prompt: list[int]
    depth: int
    plan: tuple | None
    max_new_tokens: int
    sampling: Sampling
    stop: set[int]
    events: "queue.Queue[tuple]" = field(default_factory=queue.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    row: int = -1
    pad: int = 0
    generator: torch.Generator | None = None


class Batcher:
    """Mixed-budget continuous batching over one `Runtime` (its own `rows`-row cache; call `step` from one
    thread, or `start` a worker that steps while work is pending)."""

    def __init__(self, runtime, rows: int, lock: threading.Lock | None = None) -> None:
        if rows < 1:
            raise ManyinoneError(f"batch rows {rows} out of range; allowed >= 1")
        need = runtime.cache_bytes(rows)
        if need > runtime.max_cache_bytes:
            raise ManyinoneError(f"a batch of {rows} rows needs {need / 2**20:,.1f} MiB of KV cache, over the limit of "
                                 f"{runtime.max_cache_bytes / 2**20:g} MiB (max_cache_mib); lower the batch rows")
        self.rt, self.size = runtime, rows
        stack = runtime.stack
        self.runner = SegmentRunner(stack, stack.new_cache(rows, runtime._cache_len()), runtime.graphs,
                                    runtime.compile_fn, runtime.compile_log)
        self.rows: list[BatchRequest | None] = [None] * rows
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=runtime.device)  # [rows, 1] each row's next input
        self.waiting: collections.deque[BatchRequest] = collections.deque()
        self.slot = 0  # the batch's next slot: every active row's next token goes there
        self.plan = None  # the per-layer plan of the active rows (None: full size)
        self.lock = lock or threading.Lock()  # held while stepping (shared with serial work on the runtime)
        self.wake = threading.Condition()
        self.steps = 0
        self._thread: threading.Thread | None = None

    # --- requests ------------------------------------------------------------------------------
    def submit(self, prompt: list[int], budget: float | None = None, max_new_tokens: int = 64,
               sampling: Sampling = Sampling(), stop_ids: set[int] | None = None, spec=None) -> BatchRequest:
        """Queue one prompt (checked now: a bad budget or an over-long prompt raises ManyinoneError)."""
        depth, plan = self.rt.target(budget, spec)
        self.rt.check_request([prompt], max_new_tokens)
        stop = self.rt.default_stop_ids() if stop_ids is None else stop_ids
        req = BatchRequest(list(prompt), depth, plan, max_new_tokens, sampling, set(stop))
        with self.wake:
            self.waiting.append(req)
            self.wake.notify()
        return req

    def active(self) -> list[BatchRequest]:
        return [r for r in self.rows if r is not None]

    def pending(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.rows)

    # --- scheduling ----------------------------------------------------------------------------
    def _admit(self) -> None:
        """Move waiting requests (first come first served) into free rows while they fit at the slot."""
        with self.wake:
            for req in [r for r in self.waiting if r.cancel.is_set()]:
                self.waiting.remove(req)
                req.events.put(("done", "cancelled"))
            waiting = list(self.waiting)
        if not waiting:
            return
        if not self.active():  # a fresh batch: the counter starts at the longest prompt that joins now
            self.plan, slot = waiting[0].plan, 0
            for req in waiting[: self.size]:
                longest = max(slot, len(req.prompt))
                if req.plan != self.plan or any(longest + r.max_new_tokens > self.rt.max_len
                                                for r in waiting[: waiting.index(req) + 1]):
                    break
                slot = longest
            self.slot = slot
        admitted = []
        for req in waiting:
            free = [i for i, r in enumerate(self.rows) if r is None]
            fits = (req.plan == self.plan and len(req.prompt) <= self.slot
                    and self.slot + req.max_new_tokens <= self.rt.max_len)
            if not free or not fits:
                break  # first come first served: later requests wait behind it
            self._prefill(req, free[0])
            admitted.append(req)
        with self.wake:
            for req in admitted:
                self.waiting.remove(req)

    @torch.no_grad()
    def _prefill(self, req: BatchRequest, row: int) -> None:
        rt = self.rt
        scratch = rt.runner(1)
        ids = torch.tensor([req.prompt], dtype=torch.long, device=rt.device)  # [1, prompt]
        zero = torch.zeros(1, dtype=torch.long, device=rt.device)
        logits = scratch.prefill(req.depth, ids, zero, req.plan)  # [1, 1, vocab]
        n, start = len(req.prompt), self.slot - len(req.prompt)
        src, dst = scratch.cache, self.runner.cache
        for layer in range(req.depth):  # same positions (slot - pad), so the same keys and values
            dst.layer_keys[layer][row, :, start: self.slot] = src.layer_keys[layer][0, :, :n]
            dst.layer_values[layer][row, :, start: self.slot] = src.layer_values[layer][0, :, :n]
        req.generator = torch.Generator(rt.device).manual_seed(req.sampling.seed)
        token = choose(logits[:, -1], req.sampling, req.generator)  # [1]
        self.tokens[row] = token  # the row's input at the next step
        req.row, req.pad = row, start
        self.rows[row] = req
        self._emit(req, int(token))

    def _emit(self, req: BatchRequest, token: int) -> None:
        """Record a chosen token: a stop token or the length limit ends the row."""
        if token in req.stop:
            return self._finish(req, "stop")
        req.tokens.append(token)
        req.events.put(("tokens", [token]))
        if len(req.tokens) >= req.max_new_tokens:
            self._finish(req, "length")

    def _finish(self, req: BatchRequest, reason: str) -> None:
        if req.row >= 0 and self.rows[req.row] is req:
            self.rows[req.row] = None
        req.events.put(("done", reason))

    @torch.no_grad()
    def step(self) -> bool:
        """Admit waiting requests, then one decode step for every active row. False when there was no work."""
        for req in self.active():
            if req.cancel.is_set():
                self._finish(req, "cancelled")
        self._admit()
        rows = self.active()
        if not rows:
            return False
        rt, device = self.rt, self.rt.device
        # Free rows see only their own slot (no empty softmax); their tokens are whatever is left there.
        pad = torch.tensor([self.slot if r is None else r.pad for r in self.rows], device=device)  # [rows]
        slots = rt._slots[self.slot: self.slot + 1]
        hidden, start, order, picked = self.tokens, 0, [], []
        for end in sorted({r.depth for r in rows}):  # the shared prefix of layers once, then each deeper segment
            hidden, _ = self.runner(start, end, hidden, slots, pad, head=False, slots_end=self.slot + 1, plan=self.plan)
            leaving = [r for r in rows if r.depth == end]
            index = torch.tensor([r.row for r in leaving], device=device)
            logits = rt.stack.logits(end, hidden[index])[:, -1]  # [leaving, vocab]
            if all(r.sampling.greedy for r in leaving):
                picked.append(logits.argmax(-1))  # [leaving]
            else:  # each row samples with its own settings and generator
                picked.append(torch.stack([choose(logits[i], r.sampling, r.generator) for i, r in enumerate(leaving)]))
            order += leaving
            start = end
        chosen = torch.cat(picked)  # [active], in `order`
        self.tokens[torch.tensor([r.row for r in order], device=device), 0] = chosen
        self.slot += 1
        self.steps += 1
        for req, token in zip(order, chosen.tolist()):  # the one CPU-GPU sync per step
            self._emit(req, token)
        return True

    # --- worker ----------------------------------------------------------------------------------
    def start(self) -> None:
        """A daemon worker that steps while work is pending and sleeps otherwise."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, daemon=True, name="manyinone-batcher")
            self._thread.start()

    def _work(self) -> None:
        while True:
            with self.wake:
                while not self.pending():
                    self.wake.wait()
            try:
                with self.lock:
                    self.step()
            except Exception as exc:  # every request in flight learns why; the worker stays up
                message = f"{type(exc).__name__}: {exc}"
                for req in self.active() + list(self.waiting):
                    req.events.put(("error", message))
                self.rows = [None] * self.size
                with self.wake:
                    self.waiting.clear()

    def run_all(self) -> None:
        """Step until every queued request has finished (tests and offline use)."""
        while self.pending():
            if not self.step() and self.waiting:
                raise ManyinoneError("waiting requests can never join: none fits an empty batch")


def collect(req: BatchRequest) -> tuple[list[int], str]:
    """Drain a finished request's events: (tokens, finish reason); raises on an error event."""
    out: list[int] = []
    while True:
        kind, *rest = req.events.get()
        if kind == "tokens":
            out.extend(rest[0])
        elif kind == "error":
            raise ManyinoneError(rest[0])
        else:
            return out, rest[0]

