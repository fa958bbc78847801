"""Learned router (Flextron): picks each layer's option (its size on every per-layer axis) for a
compute budget.

A small network per layer maps the budget (and, in input-adaptive mode, the mean embedding of the
input sequence) to a distribution over the layer's options. Training keeps the model frozen: the
router's choice enters the model as one prefix mask per axis (MLP neurons, attention heads, or any
axis the adapter's `layer_axes` names; a hard choice masks exactly what slicing drops), and a penalty
keeps the expected cost at the budget.

Static mode: `Router.plan(budget)` resolves a budget to one fixed per-layer configuration.

Example:
    >>> router = Router(num_layers=30, options=[{"width": 768, "heads": 6}, {"width": 1536, "heads": 9}])
    >>> plan = router.plan(0.5)        # (SubnetSpec(heads=6, width=768), ...) one per layer
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from manyinone.core.adapter import Option, require_plans
from manyinone.core.axes import LayerPlan, as_plan, encode_plan, layer_sizes, plan_axes
from manyinone.core.errors import ManyinoneError
from manyinone.train.progress import TrainProgress



# The pure math lives in routing_math (shared with the token router); re-exported here for callers.
from manyinone.elastic.routing_math import (budget_penalty, check_training_inputs, expected_cost,  # noqa: E402,F401
                                            prefix_masks)


# --- the router network ---------------------------------------------------------------------------
class Router(nn.Module):
    """Per-layer MLPs from (budget[, mean input embedding]) to logits over `options` (each one layer's
    sizes: a mapping axis -> size, or sizes listed in `axes` order; an old (width, heads) pair by default)."""

    def __init__(self, num_layers: int, options: Sequence[Option], context_size: int | None = None,
                 hidden: int = 64, axes: Sequence[str] | None = None) -> None:
        super().__init__()
        if not options:
            raise ManyinoneError("a router needs at least one option (one layer's sizes per axis)")
        self.options = list(as_plan(options, *([axes] if axes else [])))
        self.axes = plan_axes(self.options)  # the routed axes, in the order they are stored
        self.context_size = context_size  # None: static (budget only); else input-adaptive
        features = 1 + (context_size or 0)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(features, hidden), nn.GELU(), nn.Linear(hidden, len(self.options)))
            for _ in range(num_layers)
        )

    @property
    def adaptive(self) -> bool:
        return self.context_size is not None

    def forward(self, budget: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """budget: [batch] relative budgets; context: [batch, context_size] (adaptive only).
        Returns logits [batch, layers, options]."""
        x = budget.float().unsqueeze(-1)  # [batch, 1]
        if self.adaptive:
            if context is None:
                raise ManyinoneError("an input-adaptive router needs the input's context features")
            x = torch.cat([x, context.float()], dim=-1)  # [batch, 1 + context]
        return torch.stack([layer(x) for layer in self.layers], dim=1)  # [batch, layers, options]

    @torch.no_grad()
    def plan(self, budget: float, context: torch.Tensor | None = None) -> LayerPlan:
        """The most likely option per layer for `budget` (one sequence's context if adaptive)."""
        device = next(self.parameters()).device
        ctx = None if context is None else context.reshape(1, -1).to(device)
        logits = self(torch.tensor([budget], device=device), ctx)[0]  # [layers, options]
        return tuple(self.options[i] for i in logits.argmax(-1).tolist())


# --- training (model frozen) ---------------------------------------------------------------------------
@dataclass
class RouterTraining:
    budgets: Sequence[float]  # relative budgets drawn uniformly per sequence
    steps: int = 200
    lr: float = 1e-2
    fixed_cost: float = 0.0  # relative cost outside the routed layers (final norm, LM head)
    cost_weight: float = 10.0  # weight of budget_penalty against the LM loss
    temperature: float = 1.0  # Gumbel-softmax temperature
    seed: int = 0


def train_router(router: Router, adapter, batches: Sequence[dict[str, torch.Tensor]], table: torch.Tensor,
                 settings: RouterTraining, context_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 show_progress: bool = False) -> list[dict[str, float]]:
    """Fit `router` on `batches` (input_ids, attention_mask, labels) with the adapter's model frozen.

    table: [layers, options] relative cost of each option per layer; with `settings.fixed_cost`
    the full plan costs 1.
    Choices are hard (straight-through Gumbel-softmax): the forward pass sees a real sub-network.
    Returns one log row per step.
    """
    from manyinone.train.losses import supervised_positions, token_cross_entropy

    adapter = require_plans(adapter, "router training")
    check_training_inputs(batches, settings.budgets, "router training")
    model = adapter.model
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    device = next(model.parameters()).device
    router.to(device).train()
    table = table.to(device)
    unknown = sorted(set(router.axes) - set(adapter.layer_axes))
    if unknown:
        raise ManyinoneError(f"router options name axes {unknown}; the {adapter.name!r} adapter plans {list(adapter.layer_axes)}")
    sizes = {a: torch.tensor([o[a] for o in router.options]) for a in router.axes}  # [options] units kept per axis
    full_plan = adapter.plan({})  # every layer at full size: the masks alone pick the sub-network
    optimizer = torch.optim.Adam(router.parameters(), lr=settings.lr)
    rng = random.Random(settings.seed)
    gen = torch.Generator(device="cpu").manual_seed(settings.seed)
    log = []
    with TrainProgress(settings.steps, [], enabled=show_progress, description="router") as progress:
        for step in range(settings.steps):
            batch = {k: v.to(device) for k, v in batches[step % len(batches)].items()}
            rows = batch["input_ids"].shape[0]
            budget = torch.tensor([rng.choice(list(settings.budgets)) for _ in range(rows)], device=device)
            context = context_fn(batch["input_ids"], batch["attention_mask"]) if router.adaptive else None
            logits = router(budget, context)  # [batch, layers, options]
            gumbel = -torch.log(-torch.log(torch.rand(logits.shape, generator=gen).clamp(1e-9, 1 - 1e-9))).to(device)
            soft = F.softmax((logits + gumbel) / settings.temperature, dim=-1)  # [batch, layers, options]
            hard = F.one_hot(soft.argmax(-1), len(router.options)).to(soft.dtype)
            probs = hard + soft - soft.detach()  # straight-through: hard forward, soft gradient
            masks = {a: prefix_masks(probs, sizes[a], adapter.layer_axes[a].total)  # [batch, layers, units]
                     for a in router.axes}
            with adapter.masked(masks), torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
                hidden = adapter.forward_plan(batch["input_ids"], batch["attention_mask"], full_plan)
            feats, targets = supervised_positions(hidden, batch["labels"])
            ce = token_cross_entropy(adapter.exit_logits(feats), targets)
            spent = expected_cost(F.softmax(logits, -1), table) + settings.fixed_cost  # [batch]
            loss = ce + settings.cost_weight * budget_penalty(spent, budget)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            log.append({"step": step + 1, "ce": ce.item(), "loss": loss.item(),
                        "cost_gap": float((spent.detach() - budget).mean())})
            progress.update(step + 1, {})
    router.eval()
    return log


# --- static plans in a checkpoint ---------------------------------------------------------------------
OVER_BUDGET_SLACK = 1e-3  # budgets compare at 3 decimals, as index costs do


def check_within_budget(budget: float, cost: float, what: str) -> None:
    """Refuse to store a plan that costs more than the budget it is stored for (`load(budget)` would
    then serve an over-budget model, or fail)."""
    if cost > budget + OVER_BUDGET_SLACK:
        raise ManyinoneError(f"{what} for budget {budget} costs {cost:.3f}, over its budget; train the router "
                             "longer or with a higher cost weight, or drop that budget")


def plan_relative_cost(plan: Sequence[Option], table: torch.Tensor, options: Sequence[Option], fixed: float) -> float:
    """Relative cost of a per-layer plan from the option cost table ([layers, options])."""
    options = list(as_plan(options))
    return fixed + sum(float(table[i, options.index(layer_sizes(o))]) for i, o in enumerate(plan))


ROUTER_WEIGHTS, ROUTER_CONFIG = "router.safetensors", "router.json"


def router_axes_field(router: Router) -> dict:
    """{"axes": [...]} naming the order of the stored sizes, left out for (width, heads): files of a
    width/heads router stay exactly what earlier versions wrote and read."""
    from manyinone.core.axes import PAIR_AXES

    return {} if router.axes == PAIR_AXES else {"axes": list(router.axes)}


def save_router(router: Router, folder, metric: str = "flops") -> dict:
    """Write router.safetensors + router.json into `folder`, the temp folder of an atomic write
    (`save_checkpoint(write_extra=...)`): that write fsyncs, checksums and renames them with the weights."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(folder)
    config = {"options": encode_plan(router.options, router.axes), "context_size": router.context_size,
              "hidden": router.layers[0][0].out_features, "num_layers": len(router.layers), "metric": metric,
              **router_axes_field(router)}
    save_file({k: v.detach().cpu().contiguous() for k, v in router.state_dict().items()}, str(folder / ROUTER_WEIGHTS))
    (folder / ROUTER_CONFIG).write_text(json.dumps(config) + "\n")
    return config


def load_router(folder) -> Router:
    """The router stored beside a checkpoint by `export_routed`."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / ROUTER_CONFIG).is_file() or not (folder / ROUTER_WEIGHTS).is_file():
        raise ManyinoneError(f"{str(folder)!r} holds no router ({ROUTER_CONFIG} + {ROUTER_WEIGHTS}); "
                             f"write one with manyinone.elastic.router.export_routed")
    try:
        config = json.loads((folder / ROUTER_CONFIG).read_text())
        router = Router(config["num_layers"], config["options"], config["context_size"], config["hidden"],
                        config.get("axes"))
        router.load_state_dict(load_file(str(folder / ROUTER_WEIGHTS)))
    except Exception as exc:  # json, safetensors and torch each raise their own types for a bad file
        raise ManyinoneError(f"router in {str(folder)!r} is corrupt ({type(exc).__name__})") from None
    return router.eval()


def export_routed(ckpt, router: Router, budgets: Sequence[float], output, context: int = 512):
    """Write `ckpt`'s model (one copy of the weights) with the router beside it. A static router's
    plan for each of `budgets` goes into the index, so `manyinone.load(output, budget=b)` serves the
    plan that fits b; an input-adaptive one is used per prompt by `manyinone.runtime.routed`.
    A plan that costs more than its budget is refused (nothing is written)."""
    from manyinone.io.api import open_checkpoint
    from manyinone.io.export import check_export_target

    check_export_target(ckpt, output)
    return export_routed_nested(open_checkpoint(ckpt), router, budgets, output, context)


def export_routed_nested(nested, router: Router, budgets: Sequence[float], output, context: int = 512):
    """`export_routed` from an opened checkpoint (`manyinone.io.api.NestedModel`)."""
    from pathlib import Path

    from manyinone.io.checkpoint import save_checkpoint

    adapter = nested.adapter
    require_plans(adapter, "routing")
    if len(router.layers) != adapter.num_layers:
        raise ManyinoneError(f"router has {len(router.layers)} layers, the model {adapter.num_layers}")
    metric = nested.index.get("metric", "flops")
    table, fixed = adapter.option_costs(router.options, context, metric)
    routed = []
    for b in [] if router.adaptive else budgets:
        plan = router.plan(b)
        relative = plan_relative_cost(plan, table, router.options, fixed)
        check_within_budget(b, relative, "the router's plan")
        routed.append({"budget": b, "plan": encode_plan(plan, router.axes), "relative": relative})
    index = {**{k: v for k, v in nested.index.items() if k not in ("token_routed", "token_router")},
             "routed": routed,
             "router": {"options": encode_plan(router.options, router.axes), "context_size": router.context_size,
                        "metric": metric, **router_axes_field(router)}}
    # The router's files go into the same atomic write as the weights (and into its checksums).
    return Path(save_checkpoint(nested.model, nested.tokenizer, index, output, exit_heads=nested.exit_heads,
                                write_extra=lambda folder: save_router(router, folder, metric)))
