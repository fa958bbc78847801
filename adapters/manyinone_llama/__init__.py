"""Depth (SoFT) adapter for HF causal LMs with the LLaMA layout: llama, mistral, qwen2.

The layout it relies on: `model.model.layers` (decoder layers), `model.model.norm` (final norm),
`model.lm_head`. Exits are captured with forward hooks on the model's own layers and go through
the model's own final norm and LM head, so no forward code is copied from transformers.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from manyinone.core.adapter import DecoderStack, ModelAdapter
from manyinone.core.cost import Cost
from manyinone.core.space import DepthDim, NestedSpace, SubnetSpec, even_exits
from manyinone.core.errors import ManyinoneError
from manyinone.train.lean_loss import LinearHead

__all__ = ["LlamaDepthAdapter", "truncate_config"]


def _zero(linear: nn.Linear) -> None:
    linear.weight.zero_()
    if linear.bias is not None:
        linear.bias.zero_()


def truncate_config(config, depth: int):
    """A copy of an HF config with only the first `depth` decoder layers."""
    config = copy.deepcopy(config)
    config.num_hidden_layers = depth
    # Per-layer lists (sliding/full attention pattern in newer configs) must shrink with the layers.
    for key in ("layer_types", "sliding_window_pattern_layers"):
        value = getattr(config, key, None)
        if isinstance(value, list):
            setattr(config, key, value[:depth])
    return config


class LlamaDepthAdapter(ModelAdapter):
    name = "llama-depth"
    model_types = ("llama", "mistral", "qwen2")
    axes = ("depth",)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        base = getattr(model, "model", None)
        if not all(hasattr(base, a) for a in ("layers", "norm")) or not hasattr(model, "lm_head"):
            raise ManyinoneError(
                f"{type(model).__name__} lacks the LLaMA layout (model.layers, model.norm, lm_head) "
                f"that the {self.name!r} adapter needs"
            )
        self.base = base
        self.num_layers = len(base.layers)

    # --- space and cost -------------------------------------------------------------------
    def space(self, choices: Mapping[str, Sequence[int] | None]) -> NestedSpace:
        self.check_axes(list(choices))
        exits = choices.get("depth") or even_exits(self.num_layers)
        return NestedSpace([DepthDim(total=self.num_layers, choices=tuple(exits))])

    def cost(self, spec: SubnetSpec, context: int = 512) -> Cost:
        depth = spec["depth"]
        layer = self.base.layers[0]
        layer_params = sum(p.numel() for p in layer.parameters())
        matmul_params = sum(m.weight.numel() for m in layer.modules() if isinstance(m, nn.Linear))
        attn_width = layer.self_attn.q_proj.out_features
        head_params = self.model.lm_head.weight.numel()
        norm_params = sum(p.numel() for p in self.base.norm.parameters())
        # 2 FLOPs per multiply-add; attention scores and the weighted sum add 2 * 2 * context * width.
        flops = 2 * (depth * matmul_params + head_params) + depth * 4 * context * attn_width
        return Cost(params=depth * layer_params + norm_params, flops_per_token=float(flops))

    # --- forward --------------------------------------------------------------------------
    @contextmanager
    def _only_first(self, depth: int) -> Iterator[None]:
        """Run the base model with its first `depth` layers only (layers past the deepest exit cost nothing)."""
        layers, n = self.base.layers, self.base.config.num_hidden_layers
        if depth == len(layers):
            yield
            return
        self.base.layers = nn.ModuleList(list(layers)[:depth])
        self.base.config.num_hidden_layers = depth
        try:
            yield
        finally:
            self.base.layers = layers
            self.base.config.num_hidden_layers = n

    def forward_nested(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, specs: Sequence[SubnetSpec],
        position_ids: torch.Tensor | None = None,
    ) -> dict[SubnetSpec, torch.Tensor]:
        depths = sorted({s["depth"] for s in specs})
        captured: dict[int, torch.Tensor] = {}

        def capture(depth: int):
            def hook(_module, _inputs, output):
                # transformers >= 5 returns a tensor from a decoder layer, older versions a tuple.
                captured[depth] = output[0] if isinstance(output, tuple) else output

            return hook

        handles = [self.base.layers[d - 1].register_forward_hook(capture(d)) for d in depths]
        try:
            with self._only_first(depths[-1]):
                # Through the top-level model, so FSDP2's root hooks (embeddings, norm, head) run;
                # logits_to_keep=1 keeps its own head output to one position per row. Packed rows
                # (position_ids, no attention_mask) get transformers' own block-diagonal mask.
                self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=False, logits_to_keep=1)
        finally:
            for h in handles:
                h.remove()
        return {s: captured[s["depth"]] for s in specs}  # each [batch, seq, hidden]

    def exit_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.base.norm(hidden))  # [..., vocab]

    def linear_head(self) -> LinearHead | None:
        head = self.model.lm_head
        if not isinstance(head, nn.Linear) or head.bias is not None:
            return None
        return LinearHead(norm=self.base.norm, weight=head.weight)

    # --- exit blocks (exit_heads="block") ----------------------------------------------------
    def exit_block(self, index: int) -> tuple[nn.Module, nn.Module]:
        layer = self.base.layers[index]
        norm, mlp = copy.deepcopy(layer.post_attention_layernorm), copy.deepcopy(layer.mlp)
        with torch.no_grad():
            _zero(mlp.down_proj)
        return norm, mlp

    def append_exit_block(self, sub: nn.Module, norm: nn.Module, mlp: nn.Module) -> None:
        # A copy of sub's last layer with the block's norm and MLP and a zero attention output
        # projection: its attention half adds exactly 0, so the export stays a plain HF model.
        layers = sub.model.layers
        depth = len(layers)
        layer = copy.deepcopy(layers[-1])  # fresh tensors: extracted layers share theirs with the full model
        layer.post_attention_layernorm, layer.mlp = copy.deepcopy(norm), copy.deepcopy(mlp)
        with torch.no_grad():
            _zero(layer.self_attn.o_proj)
        layer.self_attn.layer_idx = depth  # its own KV-cache slot
        layers.append(layer.requires_grad_(False))
        sub.config.num_hidden_layers = depth + 1
        if getattr(sub.config, "layer_types", None):  # per-layer attention kinds (e.g. Qwen2's sliding window)
            sub.config.layer_types = [*sub.config.layer_types[:depth], sub.config.layer_types[depth - 1]]

    # --- exit layers (exit_heads="layer") ----------------------------------------------------
    def exit_layer(self, index: int) -> nn.Module:
        types = getattr(self.base.config, "layer_types", None)
        if isinstance(types, list) and index < len(types) and types[index] != types[index - 1]:
            # It runs with the mask its exit's last layer got: a sliding window there, or not.
            raise ManyinoneError(f"exit_heads='layer' at depth {index}: layer {index} is {types[index]!r} but layer "
                                 f"{index - 1} is {types[index - 1]!r}; use exit_heads=block for this exit")
        layer = copy.deepcopy(self.base.layers[index])
        with torch.no_grad():
            _zero(layer.self_attn.o_proj)
            _zero(layer.mlp.down_proj)
        return layer

    def append_exit_layer(self, sub: nn.Module, layer: nn.Module) -> None:
        layers = sub.model.layers
        depth = len(layers)
        new = copy.deepcopy(layer)
        new.self_attn.layer_idx = depth  # its own KV-cache slot
        layers.append(new.requires_grad_(False))
        sub.config.num_hidden_layers = depth + 1
        if getattr(sub.config, "layer_types", None):
            sub.config.layer_types = [*sub.config.layer_types[:depth], sub.config.layer_types[depth - 1]]

    # --- runtime ---------------------------------------------------------------------------
    def decoder_stack(self) -> DecoderStack:
        base = self.base
        if not hasattr(base, "embed_tokens") or not hasattr(base, "rotary_emb"):
            raise ManyinoneError(f"{type(self.model).__name__} lacks the LLaMA layout (embed_tokens, layers, norm, "
                                 "rotary_emb) that the runtime drives")
        attn = base.layers[0].self_attn

        def fused_layers():
            # q/k/v and gate/up re-homed into one buffer each (parameters become views): one GEMM each.
            from manyinone_llama.fused import fuse_layers

            return fuse_layers(base.layers)

        return DecoderStack(embed=lambda ids, _positions: base.embed_tokens(ids), layers=base.layers,
                            rotary=base.rotary_emb, head=self.exit_logits,
                            kv_heads=attn.k_proj.out_features // attn.head_dim, head_dim=attn.head_dim,
                            fused_layers=fused_layers)

    # --- export ---------------------------------------------------------------------------
    def extract(self, spec: SubnetSpec) -> nn.Module:
        depth = spec["depth"]
        if not 1 <= depth <= self.num_layers:
            raise ManyinoneError(f"depth={depth} out of range; allowed 1..{self.num_layers}")
        config = truncate_config(self.model.config, depth)
        with torch.device("meta"):
            sub = type(self.model)(config)
        keep = {f"model.layers.{i}." for i in range(depth)}
        state = {
            k: v
            for k, v in self.model.state_dict().items()
            if not k.startswith("model.layers.") or any(k.startswith(p) for p in keep)
        }
        sub.load_state_dict(state, strict=False, assign=True)
        # Non-persistent buffers (rotary frequencies) are not in the state dict: share the originals.
        buffers = dict(self.model.named_buffers())
        for name, buf in list(sub.named_buffers()):
            if not buf.is_meta:
                continue
            owner, _, leaf = name.rpartition(".")
            sub.get_submodule(owner).register_buffer(leaf, buffers[name], persistent=False)
        if getattr(config, "tie_word_embeddings", False):
            sub.lm_head.weight = sub.model.embed_tokens.weight
        leftover = [n for n, t in [*sub.named_parameters(), *sub.named_buffers()] if t.is_meta]
        if leftover:
            raise ManyinoneError(f"extract({spec.label}): parameters not filled: {leftover[:3]}")
        return sub.eval() if not self.model.training else sub
