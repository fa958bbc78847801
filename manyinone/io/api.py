"""Library entry points: open a manyinone checkpoint and get the sub-model for a budget.

Example:
    >>> import manyinone
    >>> model = manyinone.load("runs/demo", budget=0.5)   # a plain HF causal LM, fewer layers
    >>> model(input_ids).logits.shape                      # [batch, seq, vocab]
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from manyinone.core.adapter import ModelAdapter
from manyinone.io.checkpoint import load_index, recover_interrupted, resolve, routed_plan, verify_checkpoint
from manyinone.core.space import NestedSpace, SubnetSpec
from manyinone.core.errors import ManyinoneError, first_line, resource_error
from manyinone.train.exit_heads import ExitHeads, block_maker, module_path
from manyinone.io.loading import refuse_remote_code
from manyinone.core.registry import adapter_for


@dataclass
class NestedModel:
    """A loaded checkpoint: the full model, its tokenizer, its adapter and its budget index."""

    model: nn.Module
    tokenizer: Any
    adapter: ModelAdapter
    index: dict[str, Any]
    exit_heads: ExitHeads | None = None  # per-exit modules, when trained with exit_heads
    token_router: Any = None  # a manyinone.elastic.token_router.TokenRouter, when the index has token-routed budgets

    def token_routing(self, budget: float | None):
        """The token routing (`TokenRouting`) serving `budget`, or None when `budget` is not token-routed."""
        from manyinone.elastic.token_router_io import routing_for

        return routing_for(self, budget)

    @property
    def space(self) -> NestedSpace:
        return NestedSpace.from_dict(self.index["space"])

    def spec_for(self, budget: float | None) -> SubnetSpec:
        return resolve(self.index, budget)

    def forward_nested(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                       specs) -> dict[SubnetSpec, torch.Tensor]:
        """Each spec's last hidden state (`adapter.forward_nested`), after the exit's own decoder layer
        where it has one (exit_heads="layer"): what `exit_logits` takes."""
        from manyinone.train.exit_heads import forward_nested

        return forward_nested(self.adapter, self.exit_heads, input_ids, attention_mask, specs)

    def exit_logits(self, spec: SubnetSpec, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of `spec` from its last hidden state: its own exit modules if it has any."""
        if self.exit_heads is not None and spec in self.exit_heads:
            return self.exit_heads.linear_head(spec)(hidden)  # [..., vocab]
        return self.adapter.exit_logits(hidden)

    def sub_model(self, spec: SubnetSpec) -> nn.Module:
        """A plain HF model computing `spec` (exit modules folded into its own norm and untied head)."""
        if spec == self.space.full():
            return self.model
        sub = self.adapter.extract(spec)
        if self.exit_heads is not None and spec in self.exit_heads:
            norm = self.adapter.linear_head().norm
            sub = self.exit_heads.fold(sub, spec, module_path(self.model, norm), self.adapter.append_exit_block,
                                       self.adapter.append_exit_layer)
        return sub


def open_checkpoint(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu",
                    full_check: bool = False) -> NestedModel:
    """Load a checkpoint folder written by `manyinone train` or `manyinone export --all`.

    Every file is checked against the folder's checksums.json first (sizes, and hashes of the small
    files; `full_check`: the sha256 of every byte, as export does); weights load from safetensors
    only (never a pickle), so opening a checkpoint runs no code from it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(path)
    recover_interrupted(folder)  # a killed export or rewrite_index: undo it first
    verify_checkpoint(folder, full=full_check)  # before load_index, so a damaged manyinone.json is named as such
    refuse_remote_code(folder)
    typed = load_index(path)
    index = typed.to_dict()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True,
                                                     trust_remote_code=False).to(device)
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as exc:  # transformers/safetensors raise many types for a damaged folder
        first = first_line(exc)
        raise resource_error(exc, f"loading checkpoint {str(path)!r}") or ManyinoneError(
            f"checkpoint {str(path)!r} is corrupt or incomplete: {first}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    typed.check_model(model.config.num_hidden_layers, f"checkpoint {str(path)!r}")  # depth <= the model's layers
    adapter = adapter_for(model, list(index["space"]))
    heads = None
    if "exit_heads" in index:
        shared = adapter.linear_head()
        heads = ExitHeads.load(path, index["exit_heads"], shared.norm, shared.weight,
                               block_maker(adapter, index["exit_heads"]["kind"])).eval()
    token_router = None
    if "token_router" in index:
        from manyinone.elastic.token_router_io import load_token_router

        token_router = load_token_router(folder, adapter, index["token_router"])
    return NestedModel(model=model, tokenizer=tokenizer, adapter=adapter, index=index, exit_heads=heads,
                       token_router=token_router)


def load(path: str | os.PathLike, budget: float | None = None, dtype: torch.dtype = torch.float32,
         device: str = "cpu") -> nn.Module:
    """The sub-model of checkpoint `path` that fits `budget` (fraction of full cost; None = full).

    Returns a plain transformers model (forward gives `.logits`, `.generate` works) sharing the
    checkpoint's tensors; `model.manyinone_spec` records which sub-network it is. A token-routed
    budget returns the full model with the token router attached (`manyinone_routing`): each token
    runs its plan as prefix masks (the reference path; `manyinone.runtime` computes only the kept units).
    """
    nested = open_checkpoint(path, dtype=dtype, device=device)
    routing = nested.token_routing(budget)
    if routing is not None:  # every token on its own plan: the full model with the router's masks attached
        from manyinone.elastic.token_router_io import attach_token_routing

        sub = attach_token_routing(nested.model, nested.adapter, routing)
        sub.manyinone_spec = SubnetSpec(depth=nested.adapter.num_layers)
        return sub.eval()
    plan = routed_plan(nested.index, budget)  # a router's per-layer plan, if the index holds any
    if plan is not None:
        sub = nested.adapter.extract_plan(plan)
        sub.manyinone_plan = plan  # per layer, a SubnetSpec of its sizes; the spec records only the depth
        sub.manyinone_spec = SubnetSpec(depth=len(plan))
        return sub.eval()
    spec = nested.spec_for(budget)
    sub = nested.sub_model(spec)
    sub.manyinone_spec = spec
    return sub.eval()
