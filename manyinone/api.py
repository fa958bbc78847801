"""Library entry points: open a manyinone checkpoint and get the sub-model for a budget.

Example:
    >>> import manyinone
    >>> model = manyinone.load("runs/demo", budget=0.5)   # a plain HF causal LM, fewer layers
    >>> model(input_ids).logits.shape                      # [batch, seq, vocab]
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from manyinone.adapter import ModelAdapter
from manyinone.checkpoint import read_index, resolve
from manyinone.dims import NestedSpace, SubnetSpec
from manyinone.errors import ManyinoneError, first_line
from manyinone.integrity import verify_checksums
from manyinone.registry import adapter_for
from manyinone.router import routed_plan


@dataclass
class NestedModel:
    """A loaded checkpoint: the full model, its tokenizer, its adapter and its budget index."""

    model: nn.Module
    tokenizer: Any
    adapter: ModelAdapter
    index: dict[str, Any]

    @property
    def space(self) -> NestedSpace:
        return NestedSpace.from_dict(self.index["space"])

    def spec_for(self, budget: float | None) -> SubnetSpec:
        return resolve(self.index, budget)


def open_checkpoint(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu") -> NestedModel:
    """Load a checkpoint folder written by `manyinone train` or `manyinone export --all`.

    Every file is checked against the folder's checksums.json first; weights load from safetensors
    only (never a pickle), so opening a checkpoint runs no code from it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    index = read_index(path)
    verify_checksums(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True).to(device)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # transformers/safetensors raise many types for a damaged folder
        first = first_line(exc)
        raise ManyinoneError(f"checkpoint {str(path)!r} is corrupt or incomplete: {first}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return NestedModel(model=model, tokenizer=tokenizer, adapter=adapter_for(model, list(index["space"])), index=index)


def load(path: str | os.PathLike, budget: float | None = None, dtype: torch.dtype = torch.float32,
         device: str = "cpu") -> nn.Module:
    """The sub-model of checkpoint `path` that fits `budget` (fraction of full cost; None = full).

    Returns a plain transformers model (forward gives `.logits`, `.generate` works) sharing the
    checkpoint's tensors; `model.manyinone_spec` records which sub-network it is.
    """
    nested = open_checkpoint(path, dtype=dtype, device=device)
    plan = routed_plan(nested.index, budget)  # a router's per-layer plan, if the index holds any
    if plan is not None:
        sub = nested.adapter.extract_plan(plan)
        sub.manyinone_plan = plan
        return sub.eval()
    spec = nested.spec_for(budget)
    sub = nested.model if spec == nested.space.full() else nested.adapter.extract(spec)
    sub.manyinone_spec = spec
    return sub.eval()
