"""Pareto points of the per-prompt and per-token routers (benchmarks/pareto.py's `adaptive` and `token`).

Each point is one budget: the dev loss of the routed model and the measured average cost of the dev
tokens actually routed (relative FLOPs and params, latency-table ms), so routers that spend unevenly
are priced by what they spent, not by what they were asked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from manyinone.core.axes import PAIR_AXES, encode_plan
from manyinone.elastic.latency import plan_ms
from manyinone.elastic.router import Router, RouterTraining, plan_relative_cost, train_router
from manyinone.elastic.token_router import (TokenRouter, TokenRouterTraining, adaptivity, cost_parts, routed_forward,
                                            train_token_router, width_distribution)
from manyinone.train.data import collate
from manyinone.train.losses import supervised_positions


def _autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def _nll(adapter, hidden, labels) -> tuple[float, int]:
    feats, targets = supervised_positions(hidden, labels)
    logits = adapter.exit_logits(feats).float()  # [tokens, vocab]
    return F.cross_entropy(logits, targets, reduction="sum").item(), targets.numel()


def _options(nested):
    space = nested.space
    return sorted(space.dims["width"].choices), sorted(space.dims["heads"].choices)  # the order TokenRouter keeps


@torch.no_grad()
def _eval_token(adapter, routing, examples, pad_id, device, batch_size):
    total = count = 0
    chosen = []
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start:start + batch_size], pad_id).items()}
        with _autocast(device):
            hidden = routed_forward(adapter, routing, batch["input_ids"], batch["attention_mask"])
        nll, n = _nll(adapter, hidden, batch["labels"])
        total, count = total + nll, count + n
        index = routing.table[batch["input_ids"].cpu()]  # [batch, seq]
        chosen.append(index[batch["attention_mask"].cpu().bool()])  # the real tokens routed
    return total / count, torch.cat(chosen)


def token_joint_points(nested, batches, eval_examples, budgets, args, device, latency) -> list[dict]:
    """`token_points` with the model trained jointly (on its own fresh copy of the width run)."""
    from manyinone.io.api import open_checkpoint

    fresh = open_checkpoint(nested.index_path, device=str(device))
    return token_points(fresh, batches, eval_examples, budgets, args, device, latency, model_lr=args.joint_lr)


def token_points(nested, batches, eval_examples, budgets, args, device, latency, model_lr: float = 0.0) -> list[dict]:
    adapter, pad = nested.adapter, nested.tokenizer.pad_token_id
    widths, heads = _options(nested)
    flops, params = cost_parts(adapter, widths, heads), cost_parts(adapter, widths, heads, metric="params")
    embed = adapter.model.get_input_embeddings().weight
    torch.manual_seed(0)
    router = TokenRouter(adapter.num_layers, widths, heads, embed.shape[1], args.token_plans)
    train_token_router(router, adapter, batches, flops,
                       TokenRouterTraining(budgets=budgets, steps=args.token_steps or args.router_steps, lr=1e-2,
                                           cost_weight=args.router_cost_weight, model_lr=model_lr))
    full_flops = adapter.plan_cost(((adapter.intermediate, adapter.num_heads),) * adapter.num_layers).flops_per_token
    selector_flops = 2.0 * sum(m.weight.numel() for m in router.selector if isinstance(m, torch.nn.Linear))
    points = []
    for b in budgets:
        routing = router.routing(b, embed.detach().float())
        loss, chosen = _eval_token(adapter, routing, eval_examples, pad, device, args.batch_size)
        usage = (torch.bincount(chosen, minlength=len(routing.plans)).double() / chosen.numel()).tolist()
        cost = lambda table: sum(u * table.plan_cost(p, widths, heads) for u, p in zip(usage, routing.plans))  # noqa: E731
        point = {"spec": f"{'token-joint' if model_lr > 0 else 'token'}@{b}", "budget": b, "loss": loss, "flops": cost(flops), "params": cost(params),
                 "usage": [round(u, 3) for u in usage], "plans": [encode_plan(p, PAIR_AXES) for p in routing.plans],
                 "plan": encode_plan(routing.widest_used(), PAIR_AXES),
                 "widths_per_layer": [{str(w): round(s, 3) for w, s in layer.items()}
                                      for layer in width_distribution(routing, chosen)],
                 "adaptivity": adaptivity(routing, chosen), "router_flops": selector_flops / full_flops}
        if latency is not None:
            point["ms"] = sum(u * plan_ms(latency, p) for u, p in zip(usage, routing.plans))
        points.append(point)
    return points


@torch.no_grad()
def _eval_adaptive(adapter, router, budget, examples, pad_id, device, tables):
    total = count = 0
    spent = {k: 0.0 for k in tables}
    ms = 0.0
    plans = []
    for example in examples:
        batch = {k: v.to(device) for k, v in collate([example], pad_id).items()}
        plan = router.plan(budget, adapter.sequence_context(batch["input_ids"], batch["attention_mask"])[0])
        with _autocast(device):
            hidden = adapter.forward_plan(batch["input_ids"], batch["attention_mask"], plan)
        nll, n = _nll(adapter, hidden, batch["labels"])
        total, count = total + nll, count + n
        tokens = int(batch["attention_mask"].sum())
        for key, (table, rest, latency) in tables.items():
            spent[key] += tokens * (plan_ms(latency, plan) if latency is not None else
                                    plan_relative_cost(plan, table, router.options, rest))
        plans.append((tokens, plan))
    routed = sum(t for t, _ in plans)
    return total / count, {k: v / routed for k, v in spent.items()}, len({p for _, p in plans})


def adaptive_points(nested, batches, eval_examples, budgets, args, device, latency) -> list[dict]:
    adapter, pad = nested.adapter, nested.tokenizer.pad_token_id
    widths, heads = _options(nested)
    options = [(w, h) for w in widths for h in heads]
    table, rest = adapter.option_costs(options)
    torch.manual_seed(0)
    router = Router(adapter.num_layers, options, context_size=adapter.model.get_input_embeddings().weight.shape[1])
    train_router(router, adapter, batches, table,
                 RouterTraining(budgets=budgets, steps=args.router_steps, lr=1e-2, fixed_cost=rest,
                                cost_weight=args.router_cost_weight), context_fn=adapter.sequence_context)
    tables = {"flops": (table, rest, None), "params": (*adapter.option_costs(options, metric="params"), None)}
    if latency is not None:
        tables["ms"] = (None, None, latency)
    points = []
    for b in budgets:
        loss, spent, distinct = _eval_adaptive(adapter, router, b, eval_examples, pad, device, tables)
        widest = router.plan(b, adapter.sequence_context(*[collate(eval_examples[:1], pad)[k].to(device)
                                                          for k in ("input_ids", "attention_mask")])[0])
        points.append({"spec": f"adaptive@{b}", "budget": b, "loss": loss, **spent, "distinct_plans": distinct,
                       "plan": encode_plan(widest, PAIR_AXES)})
    return points
