"""Self-speculative decoding: the first n layers draft up to k tokens, the remaining layers verify them at once.

Lossless: greedy output equals the full model's token for token (up to float rounding between a
k-token and a 1-token forward), and sampling keeps the full model's distribution (speculative sampling).

KV reuse: a draft step runs layers 0..n-1 for one position and leaves their keys/values in the shared
cache together with the hidden state after layer n-1. The verify pass starts from those hidden states
and runs only layers n..depth-1 on the drafted positions, so no layer ever runs twice for an accepted
token. A rejected suffix is rolled back by moving the length back (slots are rewritten before being read).

Batches: every row keeps its own position in the one KV cache (per-row slots [batch, q]), so a row that
accepts 4 tokens does not wait for one that accepted 1. Rows draft and verify together; a row that
finished stays where it is (its slots are rewritten, never read). The exit and the length of each round
come from `draft_policy` (fixed, tuned, or adaptive), and a confidence threshold can end a draft early.

Fused (compiled) steps: every call has a static shape per (segment, q, batch, live bucket), so a verify
pass always runs the policy's longest draft (or `Runtime.verify_width`) positions, the ones past the
draft padded; a shortened draft (a threshold, the end of the request) or an adaptive length never
traces a new graph.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from manyinone.core.errors import ManyinoneError
from manyinone.runtime.cache import left_pad
from manyinone.runtime.draft_policy import (DEFAULT_DRAFT_TOKENS, MAX_DRAFT_TOKENS, AcceptanceTracker, DraftPlan,
                                            check_draft, plan_for)
from manyinone.runtime.sampling import Sampling, accept_sampled_rows, choose, probabilities

__all__ = ["DEFAULT_DRAFT_TOKENS", "MAX_DRAFT_TOKENS", "check_draft", "draft_settings", "plan_for",
           "speculative_stream", "speculative_batch_stream"]


def draft_settings(runtime, depth: int, draft_depth: int | None, draft_tokens: int | None) -> tuple[int, int]:
    """(first draft exit, longest draft) for verifying at `depth`; see `draft_policy.plan_for`."""
    plan = plan_for(runtime, depth, draft_depth, draft_tokens)
    return plan.exits[0], plan.max_tokens


def speculative_stream(runtime, prompt: list[int], budget: float | None, max_new_tokens: int, sampling: Sampling,
                       stop_ids: set[int] | None, draft_depth: int | None = None, draft_tokens: int | None = None,
                       stats: dict[str, Any] | None = None, threshold: float | None = None,
                       adaptive: bool | None = None) -> Iterator[list[list[int]]]:
    """Like `Runtime.stream` for one prompt: yields [[new tokens]] per accepted run of tokens."""
    for step in speculative_batch_stream(runtime, [prompt], budget, max_new_tokens, sampling, stop_ids, draft_depth,
                                         draft_tokens, stats, threshold, adaptive):
        if step[0]:
            yield step


def _top1(logits: torch.Tensor, sampling: Sampling, probs: torch.Tensor | None) -> torch.Tensor:
    """The exit's top-1 probability per row [batch] (of the sampling distribution when sampling)."""
    if probs is not None:
        return probs.amax(-1)
    return torch.softmax(logits.float(), -1).amax(-1)


def _cut(new: list[int], b: int, live: list[bool], done: list[int], stop: set[int], max_new_tokens: int) -> list[int]:
    """Row b's new tokens up to a stop token or max_new_tokens; updates its `live` flag and `done` count."""
    new = new[: max_new_tokens - done[b]]
    for j, t in enumerate(new):
        if t in stop:
            new, live[b] = new[:j], False
            break
    done[b] += len(new)
    if done[b] >= max_new_tokens:
        live[b] = False
    return new


def verify_width(runtime, plan: DraftPlan) -> int | None:
    """Positions each verify pass runs: `runtime.verify_width` if set (at least the longest draft), else the
    longest draft when the runtime's steps are compiled (a static shape per exit), else None (just the
    drafted tokens: eager and graph-only steps pay nothing for a new shape)."""
    width = getattr(runtime, "verify_width", None)
    if width is not None:
        if not 1 <= width <= MAX_DRAFT_TOKENS:
            raise ManyinoneError(f"verify width {width} out of range; allowed 1..{MAX_DRAFT_TOKENS}")
        return max(width, plan.max_tokens)
    return plan.max_tokens if getattr(runtime, "fused", False) else None


def speculative_batch_stream(runtime, prompts: list[list[int]], budget: float | None, max_new_tokens: int,
                             sampling: Sampling, stop_ids: set[int] | None, draft_depth: int | None = None,
                             draft_tokens: int | None = None, stats: dict[str, Any] | None = None,
                             threshold: float | None = None, adaptive: bool | None = None
                             ) -> Iterator[list[list[int]]]:
    """Speculative decoding of every prompt together: yields, per round, each row's new tokens ([] for a
    row with none this round or one that has finished)."""
    depth = runtime.depth_for(budget)
    plan: DraftPlan = plan_for(runtime, depth, draft_depth, draft_tokens, threshold, adaptive)
    tracker = AcceptanceTracker(plan)
    width = verify_width(runtime, plan)
    runtime.check_request(prompts, max_new_tokens, extra=max(plan.max_tokens, width or 0))
    stop = runtime.default_stop_ids() if stop_ids is None else stop_ids
    rows, device = len(prompts), runtime.device
    run = runtime.runner(rows)
    generator = torch.Generator(device).manual_seed(sampling.seed)
    hidden_size = runtime.model.config.hidden_size
    pad_id = int(getattr(runtime.model.config, "pad_token_id", None) or 0)
    offsets = torch.arange(max(MAX_DRAFT_TOKENS, width or 0), device=device)  # [K]
    drafted = accepted = rounds = plain_steps = rejections = 0
    per_exit: dict[int, list[int]] = {}  # exit -> [rounds, drafted, accepted]
    # A draft exit's own layer (exit_heads="layer") reads its cache at every earlier position: the prefill,
    # plain steps and verify passes fill it too while this stream runs.
    with torch.no_grad(), run.drafting_from(plan.exits):
        ids, pad = left_pad(prompts, pad_id, device)
        token = choose(run.prefill(depth, ids, pad)[:, -1], sampling, generator)  # [rows]
        first = token.tolist()
        live = [t not in stop for t in first]
        yield [[t] if ok else [] for t, ok in zip(first, live)]
        done = [1] * rows  # tokens emitted per row
        live = [ok and max_new_tokens > 1 for ok in live]
        pos = torch.full((rows,), ids.shape[1], dtype=torch.long, device=device)  # [rows] slot of `token`, uncached
        # The same on the host, so each call can name its live bucket without a sync: attention reads
        # only the first live_length(furthest) slots, which must cover the furthest row's query slots
        # (finished rows included: they still write at their standing slots).
        pos_host = [ids.shape[1]] * rows

        def at(slots: torch.Tensor) -> torch.Tensor:
            """Per-row slots [rows, q]; one row's as [q], the shape plain decoding's steps take, so that a
            batch-1 plain step reuses the plain step's compiled graph and drafts use its one-row cache write."""
            return slots[0] if rows == 1 else slots

        while any(live):
            n, k = tracker.choose()
            if k == 0:  # the adaptive policy expects no gain from drafting now: one plain step at the serving depth
                _, logits = run(0, depth, token[:, None], at(pos[:, None]), pad,
                                slots_end=max(pos_host) + 1)  # [rows, 1, vocab]
                live_dev = torch.tensor(live, device=device)  # [rows]
                token = torch.where(live_dev, choose(logits[:, -1], sampling, generator), token)  # [rows]
                pos = pos + live_dev.long()
                pos_host = [p + ok for p, ok in zip(pos_host, live)]
                chosen = token.tolist()  # the one sync of this step
                out = [_cut([chosen[b]], b, live, done, stop, max_new_tokens) if live[b] else [] for b in range(rows)]
                tracker.observe(None, [], [])
                plain_steps += 1
                yield out
                continue
            k = min(k, max(max_new_tokens - d for d, ok in zip(done, live) if ok))  # never draft past the end
            # Padded verify positions get zero hidden states: finite keys/values at slots past the draft, which
            # masked attention multiplies by exactly 0 until they are rewritten (garbage could be NaN: 0 * NaN).
            hidden = (torch.empty(rows, k, hidden_size, dtype=runtime.stack.dtype, device=device) if width is None
                      else torch.zeros(rows, width, hidden_size, dtype=runtime.stack.dtype,
                                       device=device))  # [rows, k or width, hidden]
            drafts = torch.empty(rows, k, dtype=torch.long, device=device)  # [rows, k]
            draft_probs = None if sampling.greedy else torch.empty(rows, k, runtime.model.config.vocab_size,
                                                                  device=device)  # [rows, k, vocab]
            # Made here, while the device is idle after the last round's sync: a host-to-device copy waits for it.
            live_dev = torch.tensor(live, device=device)  # [rows]
            sure = live_dev.clone()  # [rows] live rows whose draft is still confident
            current, d, furthest = token, k, max(pos_host)
            for i in range(k):  # draft: layers 0..n-1, one position per row, keys/values land in the cache
                h, logits = run(0, n, current[:, None], at(pos[:, None] + i), pad,
                                slots_end=furthest + i + 1)  # [rows, 1, hidden], [rows, 1, vocab]
                hidden[:, i] = h[:, 0]
                probs = None if sampling.greedy else probabilities(logits[:, -1], sampling)  # [rows, vocab]
                current = choose(logits[:, -1], sampling, generator)  # [rows]
                drafts[:, i] = current
                if probs is not None:
                    draft_probs[:, i] = probs
                if plan.threshold is not None and i < k - 1:
                    sure &= _top1(logits[:, -1], sampling, probs) >= plan.threshold
                    if not bool(sure.any()):  # a sync: every live row has doubted; verify what there is
                        d = i + 1
                        break
            # verify: layers n..depth-1 on the drafted positions of every row, from the draft's hidden states.
            # Every drafted token is verified, also a row's tokens after its own first doubt: free and lossless.
            # Compiled steps verify `width` positions whatever d is (one static shape per exit: nothing
            # recompiles when a threshold or the end of the request shortens a draft); only the first d count.
            q = d if width is None else width
            _, logits = run(n, depth, hidden[:, :q], at(pos[:, None] + offsets[:q]), pad,
                            slots_end=furthest + q)  # [rows, q, vocab]
            logits = logits[:, :d]  # [rows, d, vocab]
            if sampling.greedy:
                target = logits.argmax(-1)  # [rows, d]
                matched = (drafts[:, :d] == target).long().cumprod(1).sum(1)  # [rows]
                fix = target.gather(1, matched.clamp(max=d - 1)[:, None])[:, 0]  # [rows]
            else:
                matched, fix = accept_sampled_rows(drafts[:, :d], draft_probs[:, :d], probabilities(logits, sampling),
                                                   generator)
            short = matched < d  # [rows] a rejection: the fix token follows the accepted ones
            token = torch.where(live_dev, torch.where(short, fix, drafts[:, d - 1]), token)
            pos = pos + torch.where(live_dev, matched + short.long(), 0)
            host = torch.cat([matched, fix, drafts[:, :d].flatten()]).tolist()  # one sync per round
            m_rows, fixes = host[:rows], host[rows: 2 * rows]
            out: list[list[int]] = []
            offered, kept = [], []
            for b in range(rows):
                if not live[b]:
                    out.append([])
                    continue
                m = m_rows[b]
                pos_host[b] += m + (m < d)
                new = host[2 * rows + b * d: 2 * rows + b * d + m] + ([fixes[b]] if m < d else [])
                offered.append(d)
                kept.append(m)
                out.append(_cut(new, b, live, done, stop, max_new_tokens))
            tracker.observe(n, offered, kept)
            rejections += sum(m < o for m, o in zip(kept, offered))
            rounds, drafted, accepted = rounds + 1, drafted + sum(offered), accepted + sum(kept)
            tally = per_exit.setdefault(n, [0, 0, 0])
            tally[0], tally[1], tally[2] = tally[0] + 1, tally[1] + sum(offered), tally[2] + sum(kept)
            yield out
    if stats is not None:
        merged = {int(e): list(v) for e, v in (stats.get("exits") or {}).items()}
        for e, v in per_exit.items():
            merged[e] = [a + b for a, b in zip(merged.get(e, [0, 0, 0]), v)]
        stats.update(depth=depth, draft_depth=plan.exits[0] if not plan.adaptive else max(
            merged, key=lambda e: merged[e][0], default=plan.exits[0]), draft_tokens=plan.max_tokens,
            threshold=plan.threshold, adaptive=plan.adaptive, rounds=stats.get("rounds", 0) + rounds,
            plain_steps=stats.get("plain_steps", 0) + plain_steps,
            drafted=stats.get("drafted", 0) + drafted, accepted=stats.get("accepted", 0) + accepted,
            rejections=stats.get("rejections", 0) + rejections, exits=merged)
