"""Self-speculative decoding: the first n layers draft k tokens, the remaining layers verify them at once.

Lossless: greedy output equals the full model's token for token (up to float rounding between a
k-token and a 1-token forward), and sampling keeps the full model's distribution (speculative sampling).

KV reuse: a draft step runs layers 0..n-1 for one position and leaves their keys/values in the shared
cache together with the hidden state after layer n-1. The verify pass starts from those hidden states
and runs only layers n..depth-1 on the k positions, so no layer ever runs twice for an accepted token.
A rejected suffix is rolled back by moving the length back (slots are rewritten before being read).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from manyinone.core.errors import ManyinoneError
from manyinone.runtime.sampling import Sampling, accept_greedy, accept_sampled, choose, probabilities

DEFAULT_DRAFT_TOKENS = 4
MAX_DRAFT_TOKENS = 16


def draft_settings(runtime, depth: int, draft_depth: int | None, draft_tokens: int | None) -> tuple[int, int]:
    """(n, k) for verifying at `depth`: explicit values, else the checkpoint's tuned choice, else a default
    (the trained exit nearest a third of the depth, 4 tokens)."""
    tuned = ((runtime.index or {}).get("runtime") or {}).get("speculative") or {}
    if draft_depth is None:
        if tuned.get("draft_depth") and tuned.get("depth", depth) == depth and tuned["draft_depth"] < depth:
            draft_depth = int(tuned["draft_depth"])
        else:
            shallower = [e for e in runtime.exits() if e < depth] or [max(depth // 3, 1)]
            draft_depth = min(shallower, key=lambda e: (abs(e - depth / 3), e))
    if draft_tokens is None:
        draft_tokens = int(tuned.get("draft_tokens") or DEFAULT_DRAFT_TOKENS)
    if not 1 <= draft_depth < depth:
        raise ManyinoneError(f"draft depth {draft_depth} out of range; allowed 1..{depth - 1} "
                             f"(shallower than the verifying depth {depth})")
    if not 1 <= draft_tokens <= MAX_DRAFT_TOKENS:
        raise ManyinoneError(f"draft length {draft_tokens} out of range; allowed 1..{MAX_DRAFT_TOKENS}")
    return draft_depth, draft_tokens


def speculative_stream(runtime, prompt: list[int], budget: float | None, max_new_tokens: int, sampling: Sampling,
                       stop_ids: set[int] | None, draft_depth: int | None = None, draft_tokens: int | None = None,
                       stats: dict[str, Any] | None = None) -> Iterator[list[list[int]]]:
    """Like `Runtime.stream` for one prompt: yields [[new tokens]] per accepted run of tokens."""
    depth = runtime.depth_for(budget)
    n, k = draft_settings(runtime, depth, draft_depth, draft_tokens)
    runtime.check_request([prompt], max_new_tokens, extra=k)
    stop = runtime.default_stop_ids() if stop_ids is None else stop_ids
    run, slots, device = runtime.runner(1), runtime._slots, runtime.device
    generator = torch.Generator(device).manual_seed(sampling.seed)
    hidden_size = runtime.model.config.hidden_size
    drafted = accepted = rounds = 0
    with torch.no_grad():
        ids = torch.tensor([prompt], dtype=torch.long, device=device)  # [1, prompt]
        pad = torch.zeros(1, dtype=torch.long, device=device)
        token = choose(run.prefill(depth, ids, pad)[0, -1], sampling, generator)  # 0-dim
        stopped = int(token) in stop
        yield [[]] if stopped else [[int(token)]]
        done, pos = 1, len(prompt)  # tokens emitted; slot of `token`, whose keys/values are not cached yet
        while not stopped and done < max_new_tokens:
            hidden = torch.empty(1, k, hidden_size, dtype=runtime.stack.dtype, device=device)  # [1, k, hidden]
            drafts = torch.empty(k, dtype=torch.long, device=device)
            draft_probs = None if sampling.greedy else torch.empty(k, runtime.model.config.vocab_size, device=device)
            current = token
            for i in range(k):  # draft: layers 0..n-1, one position each, keys/values land in the cache
                h, logits = run(0, n, current.view(1, 1), slots[pos + i: pos + i + 1], pad)
                hidden[:, i] = h[:, 0]
                current = choose(logits[0, -1], sampling, generator)
                drafts[i] = current
                if draft_probs is not None:
                    draft_probs[i] = probabilities(logits[0, -1], sampling)
            # verify: layers n..depth-1 on the k drafted positions, from the draft's hidden states
            _, logits = run(n, depth, hidden, slots[pos: pos + k], pad)  # [1, k, vocab]
            if sampling.greedy:
                target = logits[0].argmax(-1)  # [k]
                matched = accept_greedy(drafts, target)
                fix = target[matched.clamp(max=k - 1)]
            else:
                matched, fix = accept_sampled(drafts, draft_probs, probabilities(logits[0], sampling), generator)
            m, fix_id, *draft_ids = torch.cat([matched.view(1), fix.view(1), drafts]).tolist()  # one sync per round
            new = draft_ids[:m] + ([fix_id] if m < k else [])
            token = fix if m < k else drafts[k - 1]
            rounds, drafted, accepted = rounds + 1, drafted + k, accepted + m
            pos += len(new)
            new = new[: max_new_tokens - done]
            for j, t in enumerate(new):
                if t in stop:
                    new, stopped = new[:j], True
                    break
            done += len(new)
            if new:
                yield [new]
    if stats is not None:
        stats.update(depth=depth, draft_depth=n, draft_tokens=k, rounds=stats.get("rounds", 0) + rounds,
                     drafted=stats.get("drafted", 0) + drafted, accepted=stats.get("accepted", 0) + accepted)
