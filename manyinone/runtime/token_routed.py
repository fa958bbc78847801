"""Decoding with the token router: every token runs its own plan, chosen from (token id, budget).

The choice is made once per token for all layers (one of the budget's K plans), so a decode step
costs one host decision, not one per layer: the host already reads each new token (stop checks), and
the token's plan is a lookup in the budget's table. Then:
- every row on the same plan (always at batch 1): the plan's own step, the same fused, graph-
  captured call a static plan of that cost runs (one graph per plan);
- rows on different plans: one step over the union of their plans (per layer the widest width),
  each row's extra neurons masked to zero, recorded as a CUDA graph per (batch, union) with the
  masks as its input (`SegmentRunner(masked=)`): with a compiled runtime, a fused compiled step of
  its own that takes the masks as an argument (it was eager, and batch 8 ran at 0.77x of the static
  plan); uncompiled, the adapter's mask hooks, which a recorded graph reads at replay.
Prefill routes every prompt token the same way, as prefix masks over the budget's union plan.

What this costs against a static plan: the next step cannot be launched before the host has read
this step's token (its plan decides which graph runs), so the host and the device take turns.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from manyinone.elastic.token_router import TokenRouting, routed_totals
from manyinone.runtime.cache import left_pad
from manyinone.runtime.sampling import Sampling, choose, step_output
from manyinone.runtime.stack import SegmentRunner


def mixed_step(rt, runner: SegmentRunner, routing: TokenRouting, rows: list[int], token: torch.Tensor,
               slot: int, pad: torch.Tensor) -> torch.Tensor:
    """One decode step for rows on different plans (rows: plan index per row). Returns logits [batch, 1, vocab]."""
    adapter = rt.stack.adapter
    union = routing.union_of(sorted(set(rows)))
    index = torch.tensor(rows, device=token.device)[:, None]  # [batch, 1]
    masks = routing.neuron_masks(index, routed_totals(adapter)[0])  # [batch, 1, layers, intermediate]
    _, logits = runner(0, rt.num_layers, token[:, None], rt._slots[slot: slot + 1], pad, slots_end=slot + 1,
                       plan=rt._plan(union), masked=(lambda m: adapter.masked({"width": m}), masks))
    return logits


def token_routed_stream(rt, prompts: list[list[int]], routing: TokenRouting, max_new_tokens: int,
                        sampling: Sampling, stop_ids: set[int] | None, stats: dict[str, Any] | None
                        ) -> Iterator[list[list[int]]]:
    """`Runtime.stream` for a token-routed budget: yields each step's new tokens per row."""
    rt.check_request(prompts, max_new_tokens)
    stop = rt.default_stop_ids() if stop_ids is None else stop_ids
    runner = rt.runner(len(prompts))
    adapter, depth = rt.stack.adapter, rt.num_layers
    pad_id = int(getattr(rt.model.config, "pad_token_id", None) or 0)
    generator = torch.Generator(rt.device).manual_seed(sampling.seed)
    table = routing.table.tolist()  # token id -> plan index, on the host where each new token is read
    plans = [rt._plan(p) for p in routing.plans]  # None: the full width (the plain, unsliced graph)
    counts = [0] * len(routing.plans)
    mixed = 0
    with torch.no_grad():
        ids, pad = left_pad(prompts, pad_id, rt.device)
        prompt_plans = routing.table.to(rt.device)[ids]  # [batch, prompt]
        with adapter.masked({"width": routing.neuron_masks(prompt_plans, routed_totals(adapter)[0])}):
            logits = runner.prefill(depth, ids, pad, rt._plan(routing.union))  # [batch, 1, vocab]
        token = choose(logits[:, -1], sampling, generator)  # [batch]
        slot, live = ids.shape[1], [True] * len(prompts)
        for step in range(max_new_tokens):
            chosen = token.tolist()  # the one CPU-GPU sync per step: this token's plan picks the next graph
            yield step_output(chosen, live, stop)
            if step == max_new_tokens - 1 or not any(live):
                break
            rows = [table[t] for t in chosen]
            first_live = next(r for r, alive in zip(rows, live) if alive)
            rows = [r if alive else first_live for r, alive in zip(rows, live)]  # a finished row follows a live one
            for r, alive in zip(rows, live):
                counts[r] += alive
            if len(set(rows)) == 1:
                _, logits = runner(0, depth, token[:, None], rt._slots[slot: slot + 1], pad, slots_end=slot + 1,
                                   plan=plans[rows[0]])
            else:
                mixed += 1
                logits = mixed_step(rt, runner, routing, rows, token, slot, pad)
            token = choose(logits[:, -1], sampling, generator)
            slot += 1
    if stats is not None:
        routed = sum(counts)
        average = sum(c * cost for c, cost in zip(counts, routing.costs)) / routed if routed and routing.costs else None
        stats.update(depth=depth, steps=step + 1, token_routed=True, plan_counts=counts, mixed_steps=mixed,
                     **({"average_cost": average} if average is not None else {}))
