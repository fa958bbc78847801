"""Flextron-style elastic width and heads, with SoFT depth, for HF causal LMs with the LLaMA layout.

A sub-network keeps the first `width` MLP neurons and the first `heads` query heads of every layer
(with grouped-query attention: whole query groups together with their KV head, so K/V stay
consistent) and the first `depth` layers. `forward_nested` swaps sliced views of the model's own
weights into the model's own modules for one pass (gradients flow into the full weights); the
attention and MLP forward code stays transformers' own, which infers head counts from the weights.

Each axis is a `manyinone.core.axes.Axis` built here from LLaMA's module names: it owns its slicing
table, its importance score and its mask hook. A per-layer plan (`LayerPlan`) is one `SubnetSpec`
per kept layer, keyed by axis ({"width": w, "heads": h}); a `SubnetSpec` for the whole model is the
uniform special case (`plan`). Everything below loops over `layer_axes`, so another axis of this layout
is one more entry in `llama_axes` (plus its dimension in `space` and its FLOPs term in `layer_cost`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from manyinone.core.adapter import ModelAdapter
from manyinone.core.axes import (PAIR_AXES, Axis, LayerPlan, Slice, as_plan, hooked, layer_sizes, permute_units,
                                 unit_scores)
from manyinone.core.cost import Cost
from manyinone.core.space import DepthDim, HeadsDim, NestedSpace, SubnetSpec, WidthDim, even_exits, even_sizes
from manyinone.core.errors import ManyinoneError
from manyinone_llama import LlamaDepthAdapter

__all__ = ["LayerPlan", "LlamaFlextronAdapter", "PLAN_AXES", "llama_axes"]

PLAN_AXES = PAIR_AXES  # this adapter's per-layer axes, in the order stored plans list them


def llama_axes(intermediate: int, num_heads: int, num_kv_heads: int, head_dim: int) -> dict[str, Axis]:
    """The width and heads axes of a LLaMA-layout decoder layer: what each slices, where its units enter."""
    group = num_heads // num_kv_heads  # query heads sharing one KV head
    mlp = [Slice(f"mlp.{p}.{leaf}", 0) for p in ("gate_proj", "up_proj") for leaf in ("weight", "bias")]
    q = [Slice(f"self_attn.q_proj.{leaf}", 0, head_dim) for leaf in ("weight", "bias")]
    kv = [Slice(f"self_attn.{p}.{leaf}", 0, head_dim, group) for p in ("k_proj", "v_proj") for leaf in ("weight", "bias")]
    return {
        "width": Axis("width", intermediate, "mlp.down_proj", (*mlp, Slice("mlp.down_proj.weight", 1))),
        "heads": Axis("heads", num_heads, "self_attn.o_proj", (*q, *kv, Slice("self_attn.o_proj.weight", 1, head_dim)),
                      unit_size=head_dim, group=group),
    }


@contextmanager
def swapped(replacements: Sequence[tuple[nn.Module, str, torch.Tensor]]) -> Iterator[None]:
    """Temporarily replace parameters `module.<leaf>` by plain tensors (e.g. sliced views)."""
    saved: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for module, leaf, tensor in replacements:
            saved.append((module, leaf, module._parameters.pop(leaf)))
            setattr(module, leaf, tensor)  # not a Parameter: an ordinary attribute the forward reads
        yield
    finally:
        for module, leaf, param in reversed(saved):
            delattr(module, leaf)
            module._parameters[leaf] = param


class LlamaFlextronAdapter(ModelAdapter):
    name = "llama-flextron"
    model_types = ("llama", "mistral", "qwen2")
    axes = ("depth", "width", "heads")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.depth = LlamaDepthAdapter(model)  # layout check, depth exits, the own final norm + head
        self.base, self.num_layers = self.depth.base, self.depth.num_layers
        attn, mlp = self.base.layers[0].self_attn, self.base.layers[0].mlp
        self.head_dim = attn.head_dim
        self.num_heads = attn.q_proj.out_features // self.head_dim
        self.num_kv_heads = attn.k_proj.out_features // self.head_dim
        self.group = self.num_heads // self.num_kv_heads  # query heads sharing one KV head
        self.intermediate = mlp.gate_proj.out_features
        self.layer_axes = llama_axes(self.intermediate, self.num_heads, self.num_kv_heads, self.head_dim)
        self._slices = {name: (axis, s) for axis in self.layer_axes.values() for name, s in axis.tensors.items()}

    # --- space and plans ------------------------------------------------------------------
    def space(self, choices: Mapping[str, Sequence[int] | None]) -> NestedSpace:
        self.check_axes(list(choices))
        defaults = {
            "depth": lambda: even_exits(self.num_layers),
            # Multiples of 64 neurons keep GPU tiles full; tiny test models get plain eighths.
            "width": lambda: even_sizes(self.intermediate, 8, 64 if self.intermediate % 512 == 0 else 1),
            "heads": lambda: even_sizes(self.num_heads, self.num_kv_heads, self.group),
        }
        kinds = {"depth": (DepthDim, self.num_layers), "width": (WidthDim, self.intermediate),
                 "heads": (HeadsDim, self.num_heads)}
        dims = []
        for axis in self.axes:  # a fixed axis order, whatever order the caller used
            if axis not in choices:
                continue
            values = tuple(choices[axis] or defaults[axis]())
            if axis == "heads" and any(h % self.group for h in values):
                raise ManyinoneError(
                    f"heads choices {list(values)}: need multiples of {self.group} (query heads per KV head, "
                    f"grouped-query attention keeps whole groups); allowed {list(range(self.group, self.num_heads + 1, self.group))}"
                )
            cls, total = kinds[axis]
            dims.append(cls(total=total, choices=values))
        return NestedSpace(dims)

    def full_sizes(self) -> SubnetSpec:
        """One layer at full size on every per-layer axis."""
        return SubnetSpec({name: axis.total for name, axis in self.layer_axes.items()})

    def plan(self, spec: Mapping[str, int]) -> LayerPlan:
        """The per-layer sizes of a uniform spec; axes the spec leaves out are full."""
        depth = spec.get("depth", self.num_layers)
        return (SubnetSpec({name: spec.get(name, axis.total) for name, axis in self.layer_axes.items()}),) * depth

    def check_plan(self, plan) -> LayerPlan:
        """`plan` (per layer a mapping axis -> size, or an old (width, heads) pair) as SubnetSpecs naming
        every axis, those a layer leaves out at full size; refused in one line if out of range."""
        plan = as_plan(plan)
        if not 1 <= len(plan) <= self.num_layers:
            raise ManyinoneError(f"layer plan of {len(plan)} layers; allowed 1..{self.num_layers}")
        checked = []
        for i, sizes in enumerate(plan):
            unknown = sorted(set(sizes) - set(self.layer_axes))
            if unknown:
                raise ManyinoneError(f"layer {i}: axes {unknown} unknown to the {self.name!r} adapter; "
                                     f"allowed {list(self.layer_axes)}")
            sizes = {name: sizes.get(name, axis.total) for name, axis in self.layer_axes.items()}
            if not all(1 <= v <= a.total and v % a.group == 0 for v, a in zip(sizes.values(), self.layer_axes.values())):
                given = ", ".join(f"{n}={v}" for n, v in sizes.items())
                allowed = ", ".join(f"{n} 1..{a.total}" if a.group == 1 else f"{n} a multiple of {a.group} up to {a.total}"
                                    for n, a in self.layer_axes.items())
                raise ManyinoneError(f"layer {i}: {given} out of range; allowed {allowed}")
            checked.append(SubnetSpec(sizes))
        return tuple(checked)

    @contextmanager
    def sliced(self, plan: LayerPlan) -> Iterator[None]:
        """Within the block, the model's layers compute `plan`'s widths and heads (depth unchanged)."""
        views = [view for layer, spec in zip(self.base.layers, self.check_plan(plan))
                 for axis in self.layer_axes.values() for view in axis.views(layer, spec[axis.name])]
        with swapped(views):
            yield

    # --- cost -------------------------------------------------------------------------------
    def layer_cost(self, index: int, sizes: Mapping[str, int], context: int = 512) -> tuple[int, float]:
        """(parameters, forward FLOPs per token) of decoder layer `index` at `sizes` (axis -> size;
        an axis left out is full)."""
        layer = self.base.layers[index]
        sizes = {**self.full_sizes(), **sizes}
        linear_weights = {f"{n}.weight" for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        params = matmul = 0
        for name, p in layer.named_parameters():
            numel = p.numel()
            if name in self._slices:
                axis, s = self._slices[name]
                numel = axis.params_kept(s, numel, p.shape[s.dim], sizes[axis.name])
            params += numel
            matmul += numel if name in linear_weights else 0
        # 2 FLOPs per multiply-add; attention scores and the weighted sum add 2 * 2 * context * width.
        return params, float(2 * matmul + 4 * context * sizes["heads"] * self.head_dim)

    def plan_cost(self, plan: LayerPlan, context: int = 512) -> Cost:
        plan = self.check_plan(plan)
        head = self.model.lm_head.weight.numel()
        params = sum(p.numel() for p in self.base.norm.parameters())
        flops = 2.0 * head
        for i, sizes in enumerate(plan):
            p, f = self.layer_cost(i, sizes, context)
            params, flops = params + p, flops + f
        return Cost(params=params, flops_per_token=flops)

    def cost(self, spec: SubnetSpec, context: int = 512) -> Cost:
        return self.plan_cost(self.plan(spec), context)

    # --- forward ----------------------------------------------------------------------------
    def forward_nested(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, specs: Sequence[SubnetSpec],
        position_ids: torch.Tensor | None = None,
    ) -> dict[SubnetSpec, torch.Tensor]:
        # One pass per layer sizes (width, heads); each pass captures all of its depths at once.
        groups: dict[SubnetSpec, list[SubnetSpec]] = {}
        for spec in specs:
            groups.setdefault(self.plan(spec)[0], []).append(spec)
        out: dict[SubnetSpec, torch.Tensor] = {}
        for sizes, members in groups.items():
            if self.model.training and getattr(self.base, "gradient_checkpointing", False) and sizes != self.full_sizes():
                # Recomputation in backward would run after the sliced weights are swapped back out.
                raise ManyinoneError("gradient checkpointing cannot train width/heads sub-networks; turn it off")
            depths = [SubnetSpec(depth=len(self.plan(s))) for s in members]
            with self.sliced((sizes,) * self.num_layers):
                hidden = self.depth.forward_nested(input_ids, attention_mask, depths, position_ids)
            out.update({s: hidden[d] for s, d in zip(members, depths)})  # each [batch, seq, hidden]
        return out

    def forward_plan(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, plan: LayerPlan) -> torch.Tensor:
        """Last hidden state [batch, seq, hidden] of a per-layer plan (before the final norm)."""
        depth = SubnetSpec(depth=len(plan))
        with self.sliced(plan):
            return self.depth.forward_nested(input_ids, attention_mask, [depth])[depth]

    @contextmanager
    def masked(self, masks: Mapping[str, torch.Tensor | None]) -> Iterator[None]:
        """Within the block, scale each layer's units of every axis in `masks` (the router's soft or hard
        choices). masks[name]: [batch, layers, total] per sequence, or [batch, seq, layers, total] per
        token (the token router's widths); an axis left out or None is untouched. A 0/1 prefix mask
        computes exactly the sliced sub-network: a dropped query group's KV head then feeds nothing."""
        unknown = sorted(set(masks) - set(self.layer_axes))
        if unknown:
            raise ManyinoneError(f"masks for axes {unknown} unknown to the {self.name!r} adapter; allowed {list(self.layer_axes)}")

        def layer_mask(m: torch.Tensor, i: int) -> torch.Tensor:
            return m[:, i] if m.dim() == 3 else m[:, :, i]  # [batch, (seq,) units]

        handles = []
        try:
            for name, axis in self.layer_axes.items():
                if masks.get(name) is not None:
                    handles += hooked(self.base.layers, axis,
                                      lambda i, axis=axis, m=masks[name]: axis.mask_hook(layer_mask(m, i)))
            yield
        finally:
            for h in handles:
                h.remove()

    def sequence_context(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean input embedding of each sequence's real tokens [batch, hidden]: what an
        input-adaptive router sees (known at prefill, so a whole generation keeps one plan)."""
        emb = self.model.get_input_embeddings()(input_ids).float()  # [batch, seq, hidden]
        keep = attention_mask.unsqueeze(-1).float()  # [batch, seq, 1]
        return (emb * keep).sum(1) / keep.sum(1).clamp(min=1)  # [batch, hidden]

    def option_costs(self, options: Sequence[Mapping[str, int]], context: int = 512,
                     metric: str = "flops") -> tuple[torch.Tensor, float]:
        """([layers, options] cost of each option (one layer's sizes) in each layer, the fixed rest:
        final norm, LM head), both relative to the full model, so the full plan's layer costs plus the
        rest sum to 1."""
        full = self.cost(SubnetSpec(), context)
        pick = {"flops": 1, "params": 0}[metric]
        total = (full.params, full.flops_per_token)[pick]
        options = [layer_sizes(o) for o in options]
        table = torch.tensor([[self.layer_cost(i, o, context)[pick] / total for o in options]
                              for i in range(self.num_layers)], dtype=torch.float64)
        rest = 1.0 - float(sum(self.layer_cost(i, self.full_sizes(), context)[pick]
                               for i in range(self.num_layers))) / total
        return table.float(), rest

    def exit_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.depth.exit_logits(hidden)  # [..., vocab]

    def linear_head(self):
        return self.depth.linear_head()  # the memory-lean loss's (final norm, head weight)

    def decoder_stack(self):
        # The depth adapter's pieces, plus the plan slicing: the runtime serves every per-layer plan
        # as views of the one copy of the weights.
        return dataclasses.replace(self.depth.decoder_stack(), sliced=self.sliced)

    # --- importance reordering ----------------------------------------------------------------
    @torch.no_grad()
    def unit_importance(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Per layer, {axis name: energy of each unit group} for one batch, for every `layer_axes` entry:
        width, one score per MLP neuron [intermediate]; heads, one per KV group [kv_heads].

        A unit's score is the energy (sum of squares over real tokens) of its activation entering the
        axis's entry (down_proj for a neuron, o_proj for a query group's heads).
        """
        return unit_scores(self.base.layers, self.layer_axes, attention_mask,
                           lambda: self.base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False))

    @torch.no_grad()
    def permute(self, orders: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """Reorder each layer's units in place, per named axis: new unit group k = old group order[k].

        The full model computes the same function afterwards; only which prefix a slice keeps changes.
        orders: per layer, {axis name: permutation [axis.groups]} (width [intermediate], heads [kv_heads]).
        """
        permute_units(self.base.layers, self.layer_axes, orders)

    # --- export ---------------------------------------------------------------------------------
    def extract(self, spec: SubnetSpec) -> nn.Module:
        return self.extract_plan(self.plan(spec))

    def extract_plan(self, plan: LayerPlan) -> nn.Module:
        """A transformers model computing `plan`. Uniform plans give a config that vanilla
        transformers rebuilds (smaller intermediate_size / head counts); mixed ones run in memory
        only (their per-layer sizes are in `config.manyinone_plan`)."""
        plan = self.check_plan(plan)
        sub = self.depth.extract(SubnetSpec(depth=len(plan)))  # shares the kept layers' tensors
        for layer, spec in zip(sub.model.layers, plan):
            for axis in self.layer_axes.values():
                for module, leaf, view in axis.views(layer, spec[axis.name]):
                    # A copy, not a view: safetensors refuses views into a larger shared storage.
                    setattr(module, leaf, nn.Parameter(view.detach().clone(), requires_grad=view.requires_grad))
                    if leaf == "weight":
                        module.out_features, module.in_features = module.weight.shape
            layer.mlp.intermediate_size = spec["width"]
        config = sub.config
        if len(set(plan)) == 1:
            width, heads = plan[0]["width"], plan[0]["heads"]
            config.intermediate_size, config.num_attention_heads = width, heads
            config.num_key_value_heads, config.head_dim = heads // self.group, self.head_dim
        else:
            config.manyinone_plan = [p.to_dict() for p in plan]  # per layer, axis -> size
        return sub
