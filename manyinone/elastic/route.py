"""Routing a trained checkpoint (what `manyinone route` and `manyinone latency` run): train a router
with the model frozen, check each budget's plans against the budget, and write a budget-indexed
checkpoint holding the router (one atomic write; the checksums cover the router's files).

Modes:
- static: one per-layer plan (every layer's size on each axis) per budget (`router.Router`), stored in the index;
- adaptive: one plan per prompt from its mean embedding (`router.Router(context_size=...)`);
- token: one of K plans per token, heads per budget (`token_router.TokenRouter`).

Example:
    >>> route_checkpoint("runs/width", "runs/token", "token", [0.4, 0.6, 0.8], data="alpaca.json", rows="0:1800")
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from manyinone.core.adapter import PlanAdapter
from manyinone.core.axes import PAIR_AXES, encode_plan
from manyinone.core.errors import ManyinoneError
from manyinone.core.space import SubnetSpec
from manyinone.elastic.router import check_within_budget
from manyinone.elastic.token_router import CostParts, TokenRouter, TokenRouterTraining, cost_parts, train_token_router
from manyinone.elastic.token_router_io import save_token_router

MODES = ("static", "adaptive", "token")


def parse_budgets(text: str) -> list[float]:
    try:
        budgets = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ManyinoneError(f"budgets {text!r} malformed; expected comma-separated fractions, e.g. 0.4,0.6,0.8") from None
    bad = [b for b in budgets if not 0 < b <= 1]
    if not budgets or bad:
        raise ManyinoneError(f"budgets {bad or text!r} out of range; allowed 0 < budget <= 1")
    return sorted(set(budgets))


def axis_choices(nested) -> dict[str, list[int]]:
    """Per axis of the adapter's layers, the checkpoint's trained sizes (full size for an axis it does not nest)."""
    space = nested.index["space"]
    return {name: sorted(space[name]["choices"]) if name in space else [axis.total]
            for name, axis in nested.adapter.layer_axes.items()}


def plan_options(nested) -> list[SubnetSpec]:
    """Every combination of the trained per-layer sizes: the options a static router or a latency table covers."""
    choices = axis_choices(nested)
    return [SubnetSpec(dict(zip(choices, sizes))) for sizes in itertools.product(*choices.values())]


def elastic_options(nested) -> tuple[list[int], list[int]]:
    """The checkpoint's trained widths and heads: the token router's two axes."""
    choices = axis_choices(nested)
    return choices["width"], choices["heads"]


def training_batches(nested, data: str, rows: str | None, batch_size: int, max_length: int) -> list[dict]:
    from manyinone.train.data import collate, load_records, tokenize_records

    template = ((nested.index.get("train") or {}).get("template")) or "alpaca"
    examples = tokenize_records(load_records(data, rows), nested.tokenizer, max_length, template)
    if not examples:
        raise ManyinoneError(f"data {data!r} rows {rows!r} hold no examples to train the router on")
    pad = nested.tokenizer.pad_token_id
    return [collate(examples[i:i + batch_size], pad) for i in range(0, len(examples), batch_size)]


def route_checkpoint(ckpt: str | os.PathLike, output: str | os.PathLike, mode: str, budgets: Sequence[float], *,
                     data: str, rows: str | None = None, steps: int = 200, batch_size: int = 8,
                     max_length: int = 512, num_plans: int = 4, cost_weight: float = 30.0, margin: float = 0.02,
                     lr: float = 1e-2, device: str = "auto", seed: int = 0) -> dict[str, Any]:
    """Train a router of `mode` on `data` and write `output`; returns what each budget got."""
    from manyinone.core.device import pick_device
    from manyinone.io.api import open_checkpoint
    from manyinone.io.export import check_export_target

    if mode not in MODES:
        raise ManyinoneError(f"route mode {mode!r} unknown; allowed {', '.join(MODES)}")
    check_export_target(ckpt, output)
    dev = pick_device(device)
    nested = open_checkpoint(ckpt, device=str(dev), full_check=True)
    adapter = nested.adapter
    if mode == "token" and (not isinstance(adapter, PlanAdapter) or "width" not in nested.index["space"]):
        space = sorted(nested.index["space"])
        raise ManyinoneError(f"{mode} routing needs a checkpoint trained with elastic width; {str(ckpt)!r} nests "
                             f"{space} (train with --axes width,heads)")
    if not isinstance(adapter, PlanAdapter) or not set(adapter.layer_axes) & set(nested.index["space"]):
        raise ManyinoneError(f"{mode} routing needs elastic width or heads (a nested per-layer axis); {str(ckpt)!r} "
                             f"nests {sorted(nested.index['space'])} (train with --axes width,heads)")
    batches = training_batches(nested, data, rows, batch_size, max_length)
    torch.manual_seed(seed)
    if mode == "token":
        return _route_tokens(nested, output, budgets, batches, steps, num_plans, cost_weight, margin, lr, seed)
    return _route_plans(nested, output, mode, budgets, batches, steps, cost_weight, lr, seed)


def _route_plans(nested, output, mode, budgets, batches, steps, cost_weight, lr, seed) -> dict[str, Any]:
    from manyinone.elastic.router import Router, RouterTraining, export_routed_nested, train_router

    adapter = nested.adapter
    options = plan_options(nested)
    metric = nested.index.get("metric", "flops")
    table, fixed = adapter.option_costs(options, metric=metric)
    adaptive = mode == "adaptive"
    hidden = adapter.model.get_input_embeddings().weight.shape[1]
    router = Router(adapter.num_layers, options, context_size=hidden if adaptive else None)
    train_router(router, adapter, batches, table,
                 RouterTraining(budgets=list(budgets), steps=steps, lr=lr, fixed_cost=fixed, cost_weight=cost_weight,
                                seed=seed), context_fn=adapter.sequence_context if adaptive else None)
    path = export_routed_nested(nested, router, budgets, output)
    return {"mode": mode, "output": str(path), "budgets": [{"budget": b} for b in budgets]}


def _route_tokens(nested, output, budgets, batches, steps, num_plans, cost_weight, margin, lr, seed) -> dict[str, Any]:
    adapter = nested.adapter
    widths, heads = elastic_options(nested)
    metric = nested.index.get("metric", "flops")
    parts = cost_parts(adapter, widths, heads, nested.index.get("context", 512), metric)
    router = TokenRouter(adapter.num_layers, widths, heads, adapter.model.get_input_embeddings().weight.shape[1],
                         num_plans)
    # The router aims `margin` below each budget, so the measured average over tokens fits inside it.
    aims = [max(b - margin, 1e-3) for b in budgets]
    train_token_router(router, adapter, batches, parts,
                       TokenRouterTraining(budgets=aims, steps=steps, lr=lr, cost_weight=cost_weight, seed=seed))
    path = export_token_routed(nested, router, dict(zip(budgets, aims)), output, batches, parts, metric)
    from manyinone.io.checkpoint import read_index

    return {"mode": "token", "output": str(path), "budgets": read_index(path)["token_routed"]}


def token_budget_entries(router: TokenRouter, adapter, aims: dict[float, float], batches, parts: CostParts
                         ) -> list[dict[str, Any]]:
    """One index entry per budget: the K plans, their costs, the calibration tokens' share of each and
    their measured average cost (refused when over the budget)."""
    embedding = adapter.model.get_input_embeddings().weight.detach()
    entries = []
    for budget, aim in aims.items():
        routing = router.routing(aim, embedding).priced(lambda p: parts.plan_cost(p, router.widths, router.heads))
        chosen = torch.cat([routing.table[b["input_ids"].cpu()][b["attention_mask"].cpu().bool()] for b in batches])
        usage = torch.bincount(chosen, minlength=router.num_plans).double() / chosen.numel()
        average = routing.average(chosen)
        check_within_budget(budget, average, "the token router's average cost over the calibration tokens")
        used = [k for k in range(router.num_plans) if usage[k] > 0]
        # Stored as (width, heads) per layer: the token router's two axes, in the index's pair layout.
        entries.append({"budget": aim, "plans": [encode_plan(p, PAIR_AXES) for p in routing.plans],
                        "costs": list(routing.costs), "usage": usage.tolist(), "average": average,
                        "widest": encode_plan(routing.union_of(used), PAIR_AXES)})
    return entries


def export_token_routed(nested, router: TokenRouter, aims: dict[float, float], output, batches, parts: CostParts,
                        metric: str = "flops") -> Path:
    """Write `nested`'s model (one copy of the weights) with the token router and its budgets in the index."""
    from manyinone.elastic.token_router_io import check_router_fits
    from manyinone.io.checkpoint import save_checkpoint

    check_router_fits(router.config(), nested.adapter, "being written")
    entries = token_budget_entries(router, nested.adapter, aims, batches, parts)
    index = {**{k: v for k, v in nested.index.items() if k not in ("routed", "router")},
             "token_routed": entries, "token_router": {**router.config(), "metric": metric}}
    return Path(save_checkpoint(nested.model, nested.tokenizer, index, output, exit_heads=nested.exit_heads,
                                write_extra=lambda folder: save_token_router(router, folder)))


def write_latency(ckpt: str | os.PathLike, output: str | os.PathLike, batch: int = 1, seq: int = 128,
                  repeats: int = 10, device: str = "auto") -> dict[str, Any]:
    """Measure the checkpoint's latency table (ms per layer for every trained per-layer option) on `device`
    and write it as JSON (what `export --budget-ms` and the routers' ms budgets read)."""
    from manyinone.core.device import pick_device
    from manyinone.elastic.latency import measure_latency, save_table
    from manyinone.io.api import open_checkpoint

    dev = pick_device(device)
    nested = open_checkpoint(ckpt, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32, device=str(dev))
    if not isinstance(nested.adapter, PlanAdapter):
        raise ManyinoneError(f"a latency table times (width, heads) options (the adapter's per-layer axes); {str(ckpt)!r} nests "
                             f"{sorted(nested.index['space'])} with the {nested.adapter.name!r} adapter")
    table = measure_latency(nested.adapter, plan_options(nested), batch=batch, seq=seq,
                            repeats=repeats, warmup=min(3, repeats))
    save_table(table, output)
    return table
