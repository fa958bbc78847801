"""Token router (Flextron's per-token routing): each token picks its own MLP width in every layer.

Design (the plan set): for a budget, the router holds K learned per-layer plans (an MLP width per
layer, shared attention heads per layer) and picks one of them per token from the token's input
embedding and the budget. One choice per token for all layers means one host decision per decode
step (one CUDA graph per plan), where per-layer choices would need a host sync per layer.

- Widths are routed per token; heads stay chosen per budget (static per layer): every token then
  writes a complete KV cache. A head some tokens skipped would leave holes later tokens read.
- Training: hard choices (straight-through Gumbel-softmax) for the token's plan, each plan's width
  per layer and the heads per layer; they enter the frozen model as prefix masks, so the forward
  sees the real routed sub-network. A penalty holds the *average* cost over a sequence's tokens at
  the budget (a token may overspend if others save).
- Serving: the choice is a function of (token id, budget) only, so a budget's routing is a lookup
  table over the vocabulary (`TokenRouting.table`), computed once when the budget is first used.

Example:
    >>> router = TokenRouter(30, widths=[384, 768, 1536], heads=[6, 9], embed_size=576, num_plans=4)
    >>> routing = router.routing(0.6, embeddings, adapter)   # K plans + the token -> plan table
    >>> routing.plans[routing.table[token_id]]               # (SubnetSpec(heads=9, width=768), ...) per layer

This router is about two named axes by design (it routes "width" per token and holds "heads" per
budget); an adapter offers them through `layer_axes`, and any other axis it has stays at full size.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from manyinone.core.adapter import require_plans
from manyinone.core.axes import LayerPlan, as_plan, widest
from manyinone.core.errors import ManyinoneError
from manyinone.core.space import SubnetSpec
from manyinone.elastic.routing_math import budget_penalty, check_training_inputs, prefix_masks


# --- pure math --------------------------------------------------------------------------------
@dataclass(frozen=True)
class CostParts:
    """A layer's relative cost split in two parts that add up: width_table [layers, widths] (the MLP
    part) + heads_table [layers, heads] (the rest of the layer), plus `fixed` (final norm, LM head).
    The full plan costs 1."""

    width_table: torch.Tensor
    heads_table: torch.Tensor
    fixed: float
    widths: tuple[int, ...] = ()  # the tables' column order (sorted, as TokenRouter keeps its options)
    heads: tuple[int, ...] = ()

    def plan_cost(self, plan: Sequence, widths: Sequence[int] | None = None,
                  heads: Sequence[int] | None = None) -> float:
        """Relative cost of a per-layer plan (its width and heads per layer)."""
        w, h = list(widths or self.widths), list(heads or self.heads)
        return self.fixed + sum(float(self.width_table[i, w.index(o["width"])] + self.heads_table[i, h.index(o["heads"])])
                                for i, o in enumerate(as_plan(plan)))


ROUTED_AXES = ("width", "heads")  # what the token router picks: width per token, heads per budget


def routed_totals(adapter) -> tuple[int, int]:
    """(full width, full heads) of the adapter's layers, or one line if it lacks either axis."""
    missing = [a for a in ROUTED_AXES if a not in adapter.layer_axes]
    if missing:
        raise ManyinoneError(f"token routing needs the per-layer axes {list(ROUTED_AXES)}; the {adapter.name!r} adapter "
                             f"plans {list(adapter.layer_axes)}")
    return adapter.layer_axes["width"].total, adapter.layer_axes["heads"].total


def cost_parts(adapter, widths: Sequence[int], heads: Sequence[int], context: int = 512,
               metric: str = "flops") -> CostParts:
    """The adapter's exact costs, split per axis: a LLaMA layer's cost is its MLP's plus its attention's.
    Columns in sorted order, the order TokenRouter keeps its options in."""
    widths, heads = sorted(int(w) for w in widths), sorted(int(h) for h in heads)
    full_w, full_h = routed_totals(adapter)
    by_width, fixed = adapter.option_costs([SubnetSpec(width=w, heads=full_h) for w in widths], context, metric)  # [layers, W]
    by_heads, _ = adapter.option_costs([SubnetSpec(width=full_w, heads=h) for h in heads], context, metric)  # [layers, H]
    full, _ = adapter.option_costs([SubnetSpec(width=full_w, heads=full_h)], context, metric)  # [layers, 1]
    return CostParts(by_width - full, by_heads, fixed, tuple(widths), tuple(heads))


def token_costs(width_probs: torch.Tensor, head_probs: torch.Tensor, parts: CostParts) -> torch.Tensor:
    """Expected relative cost of each token. width_probs: [batch, seq, layers, W]; head_probs:
    [batch, layers, H]. Returns [batch, seq]."""
    mlp = (width_probs * parts.width_table.to(width_probs)).sum(dim=(2, 3))  # [batch, seq]
    rest = (head_probs * parts.heads_table.to(head_probs)).sum(dim=(1, 2))  # [batch]
    return mlp + rest[:, None] + parts.fixed


def average_cost(per_token: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean cost over each sequence's real tokens. per_token, keep: [batch, seq]. Returns [batch]."""
    keep = keep.to(per_token.dtype)
    return (per_token * keep).sum(1) / keep.sum(1).clamp(min=1)


def token_width_probs(select: torch.Tensor, plan_widths: torch.Tensor) -> torch.Tensor:
    """Each token's width distribution per layer: select [batch, seq, K] over plans, plan_widths
    [batch, K, layers, W] each plan's distribution. Returns [batch, seq, layers, W]."""
    return torch.einsum("bsk,bklw->bslw", select, plan_widths)


def straight_through(logits: torch.Tensor, generator: torch.Generator | None, temperature: float = 1.0
                     ) -> torch.Tensor:
    """Hard one-hot choices in the forward pass, Gumbel-softmax gradients in the backward ([..., options])."""
    noise = torch.rand(logits.shape, generator=generator).clamp(1e-9, 1 - 1e-9).to(logits.device)
    soft = F.softmax((logits - torch.log(-torch.log(noise))) / temperature, dim=-1)
    hard = F.one_hot(soft.argmax(-1), logits.shape[-1]).to(soft.dtype)
    return hard + soft - soft.detach()


# --- the router network ---------------------------------------------------------------------------
class TokenRouter(nn.Module):
    """Budget -> K per-layer width plans and the per-layer heads; (token embedding, budget) -> a plan."""

    def __init__(self, num_layers: int, widths: Sequence[int], heads: Sequence[int], embed_size: int,
                 num_plans: int = 4, hidden: int = 64) -> None:
        super().__init__()
        if not widths or not heads:
            raise ManyinoneError("a token router needs at least one width and one heads option")
        if num_plans < 1:
            raise ManyinoneError(f"num_plans {num_plans} out of range; allowed >= 1")
        self.num_layers, self.embed_size, self.num_plans, self.hidden = num_layers, embed_size, num_plans, hidden
        self.widths, self.heads = sorted(int(w) for w in widths), sorted(int(h) for h in heads)
        W, H, L, K = len(self.widths), len(self.heads), num_layers, num_plans
        self.plan_net = nn.Sequential(nn.Linear(1, hidden), nn.GELU(), nn.Linear(hidden, K * L * W + L * H))
        self.selector = nn.Sequential(nn.Linear(embed_size + 1, hidden), nn.GELU(), nn.Linear(hidden, K))

    def config(self) -> dict:
        return {"num_layers": self.num_layers, "widths": self.widths, "heads": self.heads,
                "embed_size": self.embed_size, "num_plans": self.num_plans, "hidden": self.hidden}

    def plan_logits(self, budget: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """budget [batch] -> (width logits [batch, K, layers, W], heads logits [batch, layers, H])."""
        W, H, L, K = len(self.widths), len(self.heads), self.num_layers, self.num_plans
        out = self.plan_net(budget.float()[:, None])  # [batch, K*L*W + L*H]
        return out[:, : K * L * W].view(-1, K, L, W), out[:, K * L * W:].view(-1, L, H)

    def select_logits(self, budget: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """budget [batch], embeds [batch, seq, embed] (the tokens' input embeddings) -> [batch, seq, K]."""
        x = embeds.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)  # scale-free: the embedding's direction
        b = budget.float()[:, None, None].expand(*x.shape[:2], 1)  # [batch, seq, 1]
        return self.selector(torch.cat([x, b], dim=-1))  # [batch, seq, K]

    # --- serving -------------------------------------------------------------------------------
    @torch.no_grad()
    def routing(self, budget: float, embedding: torch.Tensor, chunk: int = 8192) -> "TokenRouting":
        """The serving view of `budget`: its K plans and the plan of every token id (embedding:
        [vocab, embed], the model's input embedding weight)."""
        device = next(self.parameters()).device
        b = torch.tensor([float(budget)], device=device)
        width_logits, head_logits = self.plan_logits(b)
        widths = [[self.widths[j] for j in row] for row in width_logits[0].argmax(-1).tolist()]  # [K][layers]
        heads = [self.heads[j] for j in head_logits[0].argmax(-1).tolist()]  # [layers]
        plans = tuple(tuple(SubnetSpec(width=a, heads=b) for a, b in zip(w, heads)) for w in widths)
        table = torch.cat([self.select_logits(b, embedding[i: i + chunk].to(device)[None])[0].argmax(-1).cpu()
                           for i in range(0, embedding.shape[0], chunk)])  # [vocab]
        return TokenRouting(float(budget), plans, table)


@dataclass
class TokenRouting:
    """One budget's routing as the runtime uses it: K plans (a SubnetSpec of width and heads per
    layer, the heads shared by all) and table[token id] -> plan index."""

    budget: float
    plans: tuple[LayerPlan, ...]
    table: torch.Tensor  # [vocab] long, on the CPU: looked up on the host, where the token id already is
    costs: tuple[float, ...] = ()  # relative cost of each plan (filled by `priced`)
    average_cost: float | None = None  # the stored measured average over calibration tokens
    _width_rows: torch.Tensor | None = field(default=None, repr=False)

    @property
    def union(self) -> LayerPlan:
        """Per layer, the widest width any plan uses (with the shared heads): what one pass over mixed tokens slices."""
        return widest(self.plans)

    def union_of(self, indices) -> LayerPlan:
        """`union` over the plans at `indices` only (the rows of one decode step, the plans tokens used)."""
        return widest([self.plans[k] for k in indices])

    def used(self) -> list[int]:
        """Indices of the plans some token id routes to."""
        return sorted(set(self.table.tolist()))

    def widest_used(self) -> LayerPlan:
        return self.union_of(self.used())

    def priced(self, plan_cost) -> "TokenRouting":
        self.costs = tuple(float(plan_cost(p)) for p in self.plans)
        return self

    def neuron_masks(self, plan_index: torch.Tensor, intermediate: int) -> torch.Tensor:
        """0/1 prefix masks of each token's plan: plan_index [batch, q] -> [batch, q, layers, intermediate]."""
        if self._width_rows is None or self._width_rows.device != plan_index.device:
            self._width_rows = torch.tensor([[o["width"] for o in p] for p in self.plans], device=plan_index.device)  # [K, layers]
        width = self._width_rows[plan_index]  # [batch, q, layers]
        return (torch.arange(intermediate, device=plan_index.device) < width[..., None]).float()

    def average(self, plan_index: torch.Tensor) -> float:
        """Mean relative cost of the tokens routed to `plan_index` (any shape)."""
        costs = torch.tensor(self.costs, dtype=torch.float64)
        return float(costs[plan_index.flatten().cpu()].mean())


# --- training -----------------------------------------------------------------------------------
@dataclass
class TokenRouterTraining:
    budgets: Sequence[float]  # relative budgets drawn per sequence
    steps: int = 200
    lr: float = 1e-2
    cost_weight: float = 30.0  # weight of the average-cost penalty against the LM loss
    temperature: float = 1.0
    seed: int = 0
    model_lr: float = 0.0  # > 0: train the model jointly (AdamW at this rate); 0: the model stays frozen


def routed_masks(router: TokenRouter, budget: torch.Tensor, embeds: torch.Tensor, intermediate: int,
                 num_heads: int, generator: torch.Generator | None, temperature: float = 1.0, hard: bool = True):
    """(neuron masks [batch, seq, layers, intermediate], head masks [batch, layers, heads], width
    probs [batch, seq, layers, W], head probs [batch, layers, H]): the soft probabilities for the
    cost, the straight-through (hard: one-hot forward) masks for the model."""
    width_logits, head_logits = router.plan_logits(budget)
    select_logits = router.select_logits(budget, embeds)
    soft_w = token_width_probs(F.softmax(select_logits, -1), F.softmax(width_logits, -1))
    soft_h = F.softmax(head_logits, -1)
    if hard:
        w = token_width_probs(straight_through(select_logits, generator, temperature),
                              straight_through(width_logits, generator, temperature))
        h = straight_through(head_logits, generator, temperature)
    else:
        w, h = soft_w, soft_h
    widths = torch.tensor(router.widths, device=budget.device)
    heads = torch.tensor(router.heads, device=budget.device)
    return prefix_masks(w, widths, intermediate), prefix_masks(h, heads, num_heads), soft_w, soft_h


def train_token_router(router: TokenRouter, adapter, batches: Sequence[dict[str, torch.Tensor]], parts: CostParts,
                       settings: TokenRouterTraining) -> list[dict[str, float]]:
    """Fit `router` on `batches` (input_ids, attention_mask, labels); the model frozen unless
    `settings.model_lr` > 0 (joint). Returns one log row per step (ce, the average cost's gap)."""
    from manyinone.train.losses import supervised_positions, token_cross_entropy

    adapter = require_plans(adapter, "token routing")
    if parts.widths and (list(parts.widths) != router.widths or list(parts.heads) != router.heads):
        raise ManyinoneError(f"cost tables for widths {list(parts.widths)} / heads {list(parts.heads)}, the router "
                             f"routes {router.widths} / {router.heads}; build both from the same options")
    check_training_inputs(batches, settings.budgets, "token router training")
    model = adapter.model
    joint = settings.model_lr > 0
    model.train(joint)
    for p in model.parameters():
        p.requires_grad_(joint)
    device = next(model.parameters()).device
    router.to(device).train()
    params = [{"params": router.parameters(), "lr": settings.lr}]
    if joint:
        params.append({"params": [p for p in model.parameters()], "lr": settings.model_lr})
    optimizer = torch.optim.AdamW(params, weight_decay=0.0)
    rng = random.Random(settings.seed)
    gen = torch.Generator(device="cpu").manual_seed(settings.seed)
    embed = model.get_input_embeddings()
    full_w, full_h = routed_totals(adapter)
    full = adapter.plan({})  # every layer at full size: the masks alone pick each token's plan
    log = []
    for step in range(settings.steps):
        batch = {k: v.to(device) for k, v in batches[step % len(batches)].items()}
        rows = batch["input_ids"].shape[0]
        budget = torch.tensor([rng.choice(list(settings.budgets)) for _ in range(rows)], device=device)
        with torch.no_grad():
            embeds = embed(batch["input_ids"])  # [batch, seq, embed]: the router sees, never trains, them
        neurons, heads, soft_w, soft_h = routed_masks(router, budget, embeds, full_w, full_h, gen, settings.temperature)
        with adapter.masked({"width": neurons, "heads": heads}), torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
            hidden = adapter.forward_plan(batch["input_ids"], batch["attention_mask"], full)
        feats, targets = supervised_positions(hidden, batch["labels"])
        ce = token_cross_entropy(adapter.exit_logits(feats), targets)
        spent = average_cost(token_costs(soft_w, soft_h, parts), batch["attention_mask"])  # [batch]
        loss = ce + settings.cost_weight * budget_penalty(spent, budget)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        log.append({"step": step + 1, "ce": ce.item(), "loss": loss.item(),
                    "cost_gap": float((spent.detach() - budget).mean())})
    router.eval()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return log


@torch.no_grad()
def routed_forward(adapter, routing: TokenRouting, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The plain reference of token routing: hidden [batch, seq, hidden] (before the final norm) with
    every token on its plan, as prefix masks over the union plan (no KV cache, no graphs)."""
    index = routing.table.to(input_ids.device)[input_ids]  # [batch, seq]
    masks = routing.neuron_masks(index, routed_totals(adapter)[0])  # [batch, seq, layers, intermediate]
    with adapter.masked({"width": masks}):
        return adapter.forward_plan(input_ids, attention_mask, routing.union)


# --- is it really routing per token? ----------------------------------------------------------------
def width_distribution(routing: TokenRouting, plan_index: torch.Tensor) -> list[dict[int, float]]:
    """Per layer, the share of the routed tokens (plan_index: any shape) that ran each MLP width."""
    usage = torch.bincount(plan_index.flatten().cpu(), minlength=len(routing.plans)).double()
    usage = usage / usage.sum().clamp(min=1)
    out = []
    for i in range(len(routing.plans[0])):
        shares: dict[int, float] = {}
        for k, plan in enumerate(routing.plans):
            shares[plan[i]["width"]] = shares.get(plan[i]["width"], 0.0) + float(usage[k])
        out.append({w: s for w, s in sorted(shares.items()) if s > 0})
    return out


def adaptivity(routing: TokenRouting, plan_index: torch.Tensor, min_share: float = 0.05) -> dict[str, float]:
    """How much the routing depends on the token: `distinct` (differently-sized plans each taking at
    least `min_share` of the tokens) and `layers_varying` (layers whose width differs across tokens by
    that rule). A router that always picks one width is static in disguise: distinct 1."""
    usage = torch.bincount(plan_index.flatten().cpu(), minlength=len(routing.plans)).double()
    usage = usage / usage.sum().clamp(min=1)
    kept = {tuple(o["width"] for o in routing.plans[k]) for k in range(len(routing.plans)) if usage[k] >= min_share}
    dist = width_distribution(routing, plan_index)
    varying = sum(sum(s >= min_share for s in layer.values()) > 1 for layer in dist)
    return {"distinct": float(len(kept)), "layers_varying": float(varying), "top_share": float(usage.max())}


def is_token_adaptive(routing: TokenRouting, plan_index: torch.Tensor, min_share: float = 0.05) -> bool:
    """True when at least two different width plans each serve `min_share` of the tokens."""
    return adaptivity(routing, plan_index, min_share)["distinct"] >= 2
