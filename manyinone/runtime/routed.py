"""Input-adaptive routing at generation time (Flextron): each prompt and the budget pick a per-layer
plan (every layer's size on each axis); the plan's sub-model generates.

The router sees the prompt's mean input embedding, so a whole generation keeps one plan (the KV
cache of a layer never changes size mid-sequence). Prompts that route to the same plan are decoded
together; sub-models are built once per distinct plan and kept (they share the unsliced tensors).

Example:
    >>> rt = RoutedRuntime.open("runs/routed")          # a folder written by export_routed
    >>> out = rt.generate([rt.tokenizer("Name three primes.")["input_ids"]], budget=0.5)
    >>> out.plans[0], rt.tokenizer.decode(out.tokens[0])
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from manyinone.io.api import NestedModel, open_checkpoint
from manyinone.core.adapter import require_plans
from manyinone.core.axes import LayerPlan
from manyinone.core.cost import check_budget
from manyinone.core.errors import ManyinoneError
from manyinone.elastic.router import Router, load_router


@dataclass
class RoutedGeneration:
    tokens: list[list[int]]  # new tokens per prompt (stop token excluded)
    plans: list[LayerPlan]  # the per-layer plan each prompt ran


class RoutedRuntime:
    """A checkpoint plus its router: `generate(prompts, budget)` routes every prompt on its own."""

    def __init__(self, nested: NestedModel, router: Router, keep_plans: int = 8) -> None:
        require_plans(nested.adapter, "routing")
        self.nested, self.adapter, self.tokenizer = nested, nested.adapter, nested.tokenizer
        self.router = router.to(next(nested.model.parameters()).device).eval()
        self.keep_plans = keep_plans
        self._models: OrderedDict[LayerPlan, nn.Module] = OrderedDict()

    @classmethod
    def open(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu") -> "RoutedRuntime":
        return cls(open_checkpoint(path, dtype=dtype, device=device), load_router(path))

    @torch.no_grad()
    def plan_for(self, prompt: list[int], budget: float) -> LayerPlan:
        check_budget(budget)
        device = next(self.nested.model.parameters()).device
        ids = torch.tensor([prompt], device=device)  # [1, seq]
        context = self.adapter.sequence_context(ids, torch.ones_like(ids)) if self.router.adaptive else None
        return self.router.plan(budget, context)

    def model_for(self, plan: LayerPlan) -> nn.Module:
        if plan not in self._models:
            if len(self._models) >= self.keep_plans:
                self._models.popitem(last=False)  # the least recently used plan's copies go
            self._models[plan] = self.adapter.extract_plan(plan).eval()
        self._models.move_to_end(plan)
        return self._models[plan]

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], budget: float, max_new_tokens: int = 64) -> RoutedGeneration:
        """Greedy decoding; prompts sharing a plan run as one left-padded batch."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ManyinoneError("every prompt needs at least one token")
        plans = [self.plan_for(p, budget) for p in prompts]
        tokens: list[list[int]] = [[] for _ in prompts]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        stop = self.tokenizer.eos_token_id
        device = next(self.nested.model.parameters()).device
        for plan in dict.fromkeys(plans):
            rows = [i for i, p in enumerate(plans) if p == plan]
            longest = max(len(prompts[i]) for i in rows)
            ids = torch.tensor([[pad] * (longest - len(prompts[i])) + prompts[i] for i in rows], device=device)
            mask = (torch.arange(longest, device=device)[None, :]
                    >= torch.tensor([longest - len(prompts[i]) for i in rows], device=device)[:, None]).long()  # [rows, longest]
            out = self.model_for(plan).generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                                do_sample=False, pad_token_id=pad)
            for row, i in enumerate(rows):
                new = out[row, longest:].tolist()
                tokens[i] = new[:new.index(stop)] if stop in new else new
        return RoutedGeneration(tokens=tokens, plans=plans)
