"""The token router in a checkpoint: its files (written inside the checkpoint's atomic write, so its
checksums cover them), the checks that it fits the model and the index, the routing a loaded
checkpoint serves per budget, and the plain-transformers reference path (`attach_token_routing`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from manyinone.core.axes import as_plan
from manyinone.core.errors import ManyinoneError, first_line
from manyinone.elastic.token_router import TokenRouter, TokenRouting, routed_totals

TOKEN_ROUTER_WEIGHTS, TOKEN_ROUTER_CONFIG = "token_router.safetensors", "token_router.json"


# --- storage ---------------------------------------------------------------------------------------
def save_token_router(router: TokenRouter, folder) -> dict:
    """token_router.safetensors + token_router.json into `folder`, the temp folder of an atomic
    checkpoint write (`save_checkpoint(write_extra=...)`), which fsyncs and checksums them."""
    from safetensors.torch import save_file

    folder = Path(folder)
    save_file({k: v.detach().cpu().contiguous() for k, v in router.state_dict().items()},
              str(folder / TOKEN_ROUTER_WEIGHTS))
    (folder / TOKEN_ROUTER_CONFIG).write_text(json.dumps(router.config()) + "\n")
    return router.config()


def check_router_fits(config: dict, adapter, source: str) -> None:
    """Refuse a router built for another model: its layers, widths, heads or embedding size."""
    full_w, full_h = routed_totals(adapter)
    group = adapter.layer_axes["heads"].group  # query heads per KV head
    problems = []
    if config["num_layers"] != adapter.num_layers:
        problems.append(f"{config['num_layers']} layers, the model has {adapter.num_layers}")
    bad_w = [w for w in config["widths"] if not 1 <= w <= full_w]
    if bad_w:
        problems.append(f"widths {bad_w} outside the model's 1..{full_w}")
    bad_h = [h for h in config["heads"] if not (1 <= h <= full_h and h % group == 0)]
    if bad_h:
        problems.append(f"heads {bad_h} not multiples of {group} up to {full_h}")
    embed = adapter.model.get_input_embeddings().weight.shape[1]
    if config["embed_size"] != embed:
        problems.append(f"embedding size {config['embed_size']}, the model's is {embed}")
    if problems:
        raise ManyinoneError(f"token router {source} does not match the checkpoint: {problems[0]}")


def load_token_router(folder, adapter=None, record: dict | None = None) -> TokenRouter:
    """The token router stored in a checkpoint by `export_token_routed`, checked against `adapter`'s
    model and the index's `record` of it."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path, weights = folder / TOKEN_ROUTER_CONFIG, folder / TOKEN_ROUTER_WEIGHTS
    if not cfg_path.is_file() or not weights.is_file():
        raise ManyinoneError(f"{str(folder)!r} holds no token router ({TOKEN_ROUTER_CONFIG} + {TOKEN_ROUTER_WEIGHTS}); "
                             "write one with `manyinone route CKPT --mode token`")
    try:
        config = json.loads(cfg_path.read_text())
        keys = {"num_layers", "widths", "heads", "embed_size", "num_plans", "hidden"}
        if not isinstance(config, dict) or set(config) != keys:
            raise ValueError(f"keys {sorted(config) if isinstance(config, dict) else type(config).__name__}")
    except (OSError, ValueError) as exc:
        raise ManyinoneError(f"token router config {str(cfg_path)!r} unreadable ({first_line(exc)}); "
                             f"expected keys {sorted(keys)}") from None
    if record is not None:
        differ = sorted(k for k in config if record.get(k) != config[k])
        if differ:
            raise ManyinoneError(f"token router in {str(folder)!r} does not match the checkpoint's index: "
                                 f"{differ[0]} is {config[differ[0]]} in {TOKEN_ROUTER_CONFIG}, {record.get(differ[0])} in the index")
    if adapter is not None:
        check_router_fits(config, adapter, repr(str(folder)))
    router = TokenRouter(config["num_layers"], config["widths"], config["heads"], config["embed_size"],
                         config["num_plans"], config["hidden"])
    try:
        router.load_state_dict(load_file(str(weights)))
    except Exception as exc:  # safetensors and torch raise their own types for a bad or mismatched file
        raise ManyinoneError(f"token router weights in {str(folder)!r} do not match its config "
                             f"({type(exc).__name__})") from None
    return router.eval()


# --- a loaded checkpoint's routings ------------------------------------------------------------------
def routing_for(nested, budget: float | None) -> TokenRouting | None:
    """The routing serving `budget` in an opened checkpoint (built once per stored budget, kept on it)."""
    from manyinone.io.checkpoint import token_routed_budget

    entry = token_routed_budget(nested.index, budget)
    if entry is None:
        return None
    if nested.token_router is None:
        raise ManyinoneError("the checkpoint's index lists token-routed budgets but it holds no token router "
                             f"({TOKEN_ROUTER_CONFIG}); it is corrupt, write it again with `manyinone route`")
    cache = nested.__dict__.setdefault("_routings", {})
    if entry.budget not in cache:
        embedding = nested.model.get_input_embeddings().weight.detach()
        routing = nested.token_router.to(embedding.device).routing(entry.budget, embedding)
        stored = tuple(as_plan(p) for p in entry.plans)  # stored as (width, heads) per layer
        if routing.plans != stored:
            raise ManyinoneError(f"token router does not match the checkpoint's index: its plans for budget "
                                 f"{entry.budget} differ from the stored ones; write it again with `manyinone route`")
        routing.costs = tuple(entry.costs)
        routing.average_cost = entry.average
        cache[entry.budget] = routing
    return cache[entry.budget]


def attach_token_routing(model: nn.Module, adapter, routing: TokenRouting) -> nn.Module:
    """Make `model` (the adapter's full model) route every token it is called on: its forward runs
    inside the adapter's prefix masks of each input token's plan and of the budget's heads. Works with
    `generate` (each call's input_ids are the new tokens); inputs_embeds are refused (no token ids)."""
    plain = model.forward
    full_w, full_h = routed_totals(adapter)
    heads = torch.tensor([[o["heads"] for o in routing.plans[0]]])  # [1, layers]
    head_masks = (torch.arange(full_h) < heads[..., None]).float()  # [1, layers, heads]

    def forward(*args, input_ids=None, **kwargs):
        if input_ids is None:
            raise ManyinoneError("a token-routed model needs input_ids (its router reads the tokens), not inputs_embeds")
        index = routing.table.to(input_ids.device)[input_ids]  # [batch, seq]
        masks = routing.neuron_masks(index, full_w)  # [batch, seq, layers, intermediate]
        with adapter.masked({"width": masks, "heads": head_masks.to(input_ids.device)}):
            return plain(*args, input_ids=input_ids, **kwargs)

    model.forward = forward  # an instance attribute: nn.Module.__call__ dispatches to it
    model.manyinone_routing = routing
    return model
