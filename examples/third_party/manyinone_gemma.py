"""Gemma depth exits for manyinone, written as a third party would: the public API only.

Gemma keeps LLaMA's module layout (model.layers, model.norm, lm_head, rotary embeddings) and scales
its embeddings inside its own embedding module, so the built-in LLaMA depth adapter's mechanics
apply unchanged; this adapter holds one (composition, not a subclass chain) and registers itself
for the `gemma` model type. Check it with `manyinone.testing.check_adapter` (see test below).

Install as a package with, in its pyproject:
    [project.entry-points."manyinone.adapters"]
    gemma = "manyinone_gemma:GemmaDepthAdapter"
or import this module (it registers itself).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

import manyinone
from manyinone import Cost, DecoderStack, ModelAdapter, NestedSpace, SubnetSpec
from manyinone_llama import LlamaDepthAdapter


class GemmaDepthAdapter(ModelAdapter):
    name = "gemma-depth"
    model_types = ("gemma",)
    axes = ("depth",)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.layout = LlamaDepthAdapter(model)  # checks model.layers / model.norm / lm_head
        self.num_layers = self.layout.num_layers

    def space(self, choices: Mapping[str, Sequence[int] | None]) -> NestedSpace:
        self.check_axes(list(choices))
        return self.layout.space(choices)

    def forward_nested(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                       specs: Sequence[SubnetSpec], position_ids: torch.Tensor | None = None
                       ) -> dict[SubnetSpec, torch.Tensor]:
        return self.layout.forward_nested(input_ids, attention_mask, specs, position_ids)  # hooks on Gemma's own layers

    def exit_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.layout.exit_logits(hidden)  # Gemma's own (1 + weight) RMSNorm and head

    def linear_head(self):
        return self.layout.linear_head()

    def cost(self, spec: SubnetSpec, context: int = 512) -> Cost:
        return self.layout.cost(spec, context)

    def extract(self, spec: SubnetSpec) -> nn.Module:
        return self.layout.extract(spec)  # a plain GemmaForCausalLM with the first `depth` layers

    def decoder_stack(self) -> DecoderStack:
        return self.layout.decoder_stack()  # the embedding module applies Gemma's sqrt(hidden) scale


manyinone.register_adapter(GemmaDepthAdapter)
