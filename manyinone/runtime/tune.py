"""Pick the self-speculation policy by timing a few prompts; store it in the checkpoint.

Fixed (draft exit, draft length) pairs, a confidence threshold and the adaptive per-round policy are
timed against plain greedy decoding. The choice, with each exit's measured step cost and acceptance,
lives in the checkpoint's budget index under "runtime" -> "speculative" (manyinone.json and the
weights' metadata), where `Runtime` finds it (explicit draft settings in a call still win).
"""

from __future__ import annotations

import copy
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from manyinone.io.checkpoint import INDEX_FILE, read_index, rewrite_index
from manyinone.core.errors import ManyinoneError
from manyinone.runtime.draft_policy import MAX_DRAFT_TOKENS, check_draft
from manyinone.runtime.generate import Generation, Runtime, synchronize

DRAFT_LENGTHS = (2, 3, 4, 6, 8)
THRESHOLDS = (0.5,)  # confidence thresholds tried with a longer draft


def instruction_prompts(runtime: Runtime, data: str, rows: str | None, count: int) -> list[list[int]]:
    """Token ids of the first `count` instructions of a data set, wrapped in the checkpoint's training
    template (what the model saw in training), answers left out."""
    from manyinone.train.data import encode_prompt, load_records

    template = ((runtime.index or {}).get("train") or {}).get("template", "alpaca")
    records = load_records(data, rows)[:count]
    if not records:
        raise ManyinoneError(f"data {data!r} rows {rows!r} hold no records; need at least one prompt")
    return [encode_prompt(r, runtime.tokenizer, template) for r in records]


def decode_rate(runtime: Runtime, prompts: list[list[int]], max_new_tokens: int, budget: float | None = None,
                **kwargs: Any) -> tuple[float, list[Generation]]:
    """Decode tokens/s (prefill excluded) over `prompts`, one at a time, never stopping early."""
    runs = [runtime.generate([p], budget, max_new_tokens, stop_ids=set(), **kwargs) for p in prompts]
    tokens = sum(len(g.tokens[0]) - 1 for g in runs)
    seconds = sum(g.decode_s for g in runs)
    return (tokens / seconds if seconds > 0 else 0.0), runs


def measure_step_costs(runtime: Runtime, depth: int, exits: list[int], steps: int = 20) -> dict[int, float]:
    """Measured time of one batch-1 draft step (layers 0..n and the exit's head) relative to one plain
    step at `depth`, per exit: what the draft policy's cost model needs, launch overheads included.
    (It writes keys/values at slot 0 of the batch-1 cache, reading the first live bucket as a short
    decode does; every generation prefills it anew.)"""
    run = runtime.runner(1)
    device = runtime.device
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    slots = runtime._slots[:1]  # [1]: what batch-1 plain and draft steps both take
    pad = torch.zeros(1, dtype=torch.long, device=device)

    def seconds(end: int) -> float:
        with torch.no_grad():
            run(0, end, token, slots, pad, slots_end=1)  # records the graph / compiles
            synchronize(device)
            start = time.perf_counter()
            for _ in range(steps):
                run(0, end, token, slots, pad, slots_end=1)
            synchronize(device)
        return (time.perf_counter() - start) / steps

    # The calls batch-1 decoding makes: a fused runtime times (and compiles) the very steps it then runs.
    full = seconds(depth)
    return {n: min(seconds(n) / full, 1.0) for n in exits}


@contextmanager
def _policy(runtime: Runtime, policy: dict[str, Any]):
    """Let `runtime` read `policy` as if the checkpoint stored it (trials of the tuned, adaptive policy)."""
    saved = runtime.index
    index = copy.deepcopy(saved) if saved is not None else {}
    index.setdefault("runtime", {})["speculative"] = policy
    runtime.index = index if saved is not None else None
    try:
        yield
    finally:
        runtime.index = saved


def warmed_rate(runtime: Runtime, prompts: list[list[int]], max_new_tokens: int, budget: float | None = None,
                **kwargs: Any) -> tuple[float, list[Generation], dict[str, float]]:
    """`decode_rate` after an identical untimed run, which compiles and records every (segment, shape, live
    bucket) the timed run reaches (greedy runs repeat exactly, an adaptive policy's choices included), plus
    {"warmup_s": seconds of that run, "compile_s": of it spent compiling, "timed_compiles": compiles during
    the timed run, 0 unless something recompiled}."""
    log = runtime.compile_log
    compile_s, start = log.seconds, time.perf_counter()
    decode_rate(runtime, prompts, max_new_tokens, budget, **kwargs)
    warm = {"warmup_s": time.perf_counter() - start, "compile_s": log.seconds - compile_s}
    before = log.compiles
    rate, runs = decode_rate(runtime, prompts, max_new_tokens, budget, **kwargs)
    return rate, runs, {**warm, "timed_compiles": log.compiles - before}


def _trial(runtime, prompts, max_new_tokens, budget, settings: dict[str, Any]) -> dict[str, Any]:
    rate, runs, warm = warmed_rate(runtime, prompts, max_new_tokens, budget, speculative=True, **settings)
    drafted = sum(g.stats["drafted"] for g in runs)
    rounds = sum(g.stats["rounds"] + g.stats.get("plain_steps", 0) for g in runs)  # a plain step: a 1-token round
    emitted = sum(len(g.tokens[0]) - 1 for g in runs)
    accepted = sum(g.stats["accepted"] for g in runs)
    return {**settings, "tokens_per_s": rate, "acceptance": accepted / max(drafted, 1),
            "tokens_per_round": emitted / max(rounds, 1), "accepted": accepted, "drafted": drafted,
            "rejections": sum(g.stats["rejections"] for g in runs), **warm}


def autotune(runtime: Runtime, prompts: list[list[int]], max_new_tokens: int = 64, budget: float | None = None,
             draft_depths: list[int] | None = None, draft_lengths: tuple[int, ...] = DRAFT_LENGTHS,
             thresholds: tuple[float, ...] = THRESHOLDS, adaptive: bool = True,
             deadline: float | None = None, progress: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Time plain greedy decoding, every fixed (draft exit, draft length) pair, then the adaptive policy
    and confidence thresholds; return the fastest policy with the per-exit statistics it runs on.

    Default draft exits: the checkpoint's trained exits shallower than the verifying depth. Each setting
    runs once untimed first (that compiles and records its steps), so the timings are of the runtime as
    given: a fused runtime's policy is chosen on fused timings. A fused runtime verifies every setting
    over the longest draft tried (`Runtime.verify_width`, unless set): one compiled verify graph per exit
    serves every length. The returned "exits" list (measured step cost and per-token acceptance per exit)
    is what an adaptive policy starts from at serving time; a trial's "acceptance" is accepted / drafted
    tokens (the figure the issue reports). `deadline` (time.perf_counter()): no further draft exit is
    started after it (its first trial compiles its steps; listed under "skipped"); the first exit always
    runs, and the threshold and adaptive trials over the exits timed reuse their compiled steps.
    `progress`: a list each timing is appended to as it finishes (the plain baseline first), for a caller
    that may be interrupted before the choice returns.
    """
    depth = runtime.depth_for(budget)
    depths = draft_depths or [e for e in runtime.exits() if e < depth]
    if not depths:
        raise ManyinoneError(f"no draft exit shallower than depth {depth}; give draft depths explicitly")
    for n in depths:
        check_draft(depth, n)
    for k in draft_lengths:
        check_draft(depth, draft_tokens=k)
    for t in thresholds:
        check_draft(depth, threshold=t)
    longest = min(max(draft_lengths) * 2, MAX_DRAFT_TOKENS)
    saved_width = runtime.verify_width
    if runtime.fused and saved_width is None:
        runtime.verify_width = longest
    try:
        return _sweep(runtime, prompts, max_new_tokens, budget, depth, depths, draft_lengths, thresholds, adaptive,
                      longest, deadline, [] if progress is None else progress)
    finally:
        runtime.verify_width = saved_width


def _sweep(runtime, prompts, max_new_tokens, budget, depth, depths, draft_lengths, thresholds, adaptive, longest,
           deadline, progress) -> dict[str, Any]:
    skipped: list[dict[str, Any]] = []

    def trial(settings: dict[str, Any]) -> dict[str, Any]:
        progress.append(_trial(runtime, prompts, max_new_tokens, budget, settings))
        return progress[-1]

    baseline, _, baseline_warm = warmed_rate(runtime, prompts, max_new_tokens, budget)
    progress.append({"plain": True, "tokens_per_s": baseline, **baseline_warm})
    costs: dict[int, float] = {}
    trials = []
    for n in depths:  # shallowest (cheapest) exits first
        if costs and deadline is not None and time.perf_counter() > deadline:  # the first exit always runs
            skipped += [{"draft_depth": n, "draft_tokens": k} for k in draft_lengths]
            continue
        costs.update(measure_step_costs(runtime, depth, [n]))
        trials += [trial({"draft_depth": n, "draft_tokens": k}) for k in draft_lengths]
    exits = []
    for n in depths:
        # Per-token acceptance (the draft policy's alpha): kept / (kept + first rejections). Tokens drafted
        # after a rejection were never judged, so accepted / drafted would understate it, the more so for long drafts.
        mine = [t for t in trials if t["draft_depth"] == n]
        if not mine:
            continue
        kept = sum(t["accepted"] for t in mine)
        alpha = kept / max(kept + sum(t["rejections"] for t in mine), 1)
        exits.append({"exit": n, "cost": round(costs[n], 4), "acceptance": round(alpha, 4)})
    best_fixed = max(trials, key=lambda t: t["tokens_per_s"])
    for t in thresholds:  # a longer draft that stops at the first doubt
        trials.append(trial({"draft_depth": best_fixed["draft_depth"], "draft_tokens": longest, "draft_threshold": t}))
    if adaptive and len(exits) > 1 and runtime.index is not None:  # a plain model has no index to tune
        for t in (None, *thresholds):
            policy = {"depth": depth, "adaptive": True, "exits": exits, "draft_tokens": longest, "threshold": t}
            with _policy(runtime, policy):
                done = _trial(runtime, prompts, max_new_tokens, budget, {})
            trials.append({**done, "adaptive": True, "draft_tokens": longest, "draft_threshold": t})
            progress.append(trials[-1])
    best = max(trials, key=lambda t: t["tokens_per_s"])
    return {"depth": depth, "draft_depth": best.get("draft_depth", best_fixed["draft_depth"]),
            "draft_tokens": best["draft_tokens"], "threshold": best.get("draft_threshold"),
            "adaptive": bool(best.get("adaptive")), "exits": exits, "tokens_per_s": best["tokens_per_s"],
            "acceptance": best["acceptance"], "tokens_per_round": best["tokens_per_round"],
            "baseline_tokens_per_s": baseline, "speedup": best["tokens_per_s"] / baseline if baseline else 0.0,
            "device": str(runtime.device), "dtype": str(runtime.stack.dtype).replace("torch.", ""),
            "fused": runtime.fused, "verify_width": runtime.verify_width,
            "prompts": len(prompts), "max_new_tokens": max_new_tokens, "trials": trials,
            "baseline_warmup": baseline_warm, "skipped": skipped,
            "compiles": runtime.compile_log.compiles, "compile_s": runtime.compile_log.seconds}


def store_choice(ckpt: str | os.PathLike, choice: dict[str, Any]) -> Path:
    """Record `choice` in the checkpoint's budget index: manyinone.json and the copy in the weights'
    metadata change together (`checkpoint.rewrite_index`, one atomic folder write, checksums renewed).
    The checkpoint is verified first, so a damaged one is never re-blessed."""
    folder = Path(ckpt)
    if not (folder / INDEX_FILE).is_file():
        read_index(folder)  # a missing or foreign folder: that error first
        raise ManyinoneError(f"checkpoint {str(ckpt)!r} has no {INDEX_FILE} to record the tuned settings in")
    keep = ("depth", "draft_depth", "draft_tokens", "threshold", "adaptive", "exits", "tokens_per_s",
            "baseline_tokens_per_s", "speedup", "acceptance", "tokens_per_round", "device", "dtype", "fused",
            "prompts", "max_new_tokens")

    def update(index: dict[str, Any]) -> dict[str, Any]:
        index.setdefault("runtime", {})["speculative"] = {k: choice[k] for k in keep if k in choice}
        return index

    rewrite_index(folder, update)
    return folder / INDEX_FILE
