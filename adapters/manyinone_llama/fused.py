"""The fused decode forward of a LLaMA-layout decoder layer (llama, mistral, qwen2), for the runtime's
compiled step only.

HF's decoder layer launches seven GEMVs per decode token (q, k, v, o, gate, up, down). `fuse_layers`
re-homes each layer's q/k/v weights into ONE [q+k+v, hidden] buffer and gate/up into ONE
[2*ffn, hidden] buffer (biases too, when the model has them, e.g. qwen2's q/k/v biases), and turns
the HF modules' `.weight`/`.bias` parameters into views (`narrow` along dim 0) of those buffers: the
values and the parameter objects' identity stay what the model had, no memory is doubled (the old
storages are freed), and anything that reads or updates the modules in place (HF forwards, training,
in-place permutes, state dicts) sees the same numbers. `FusedLayers.restore()` gives every parameter
its own storage back (what safetensors wants before saving: it refuses tensors sharing storage).

`FusedDecoderLayer` is a drop-in for the HF layer's call in the runtime's decode step: one GEMM for
q/k/v, one for gate/up, everything else (norms, rotary, cache write, attention function, o_proj,
activation, down_proj) is the model's own modules and functions. Under a width/heads plan the
adapter swaps sliced views into the modules (`LlamaFlextronAdapter.sliced`); the sizes are read
from those views and the fused buffers are sliced per section, since a plan keeps a prefix of every
section, not of the buffer:
- q/k/v: q keeps rows [0, heads*head_dim), k and v each keep their first kv*head_dim rows: one GEMM
  for q and one batched GEMM over the [2, kv rows, hidden] view of the k/v sections (multi-head
  attention, where the three sections are equal: one batched GEMM over all three);
- gate/up: the [2, ffn, hidden] view keeps [:, :width]: one batched GEMM.
At full size each is one plain GEMM over the whole buffer.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from manyinone.core.errors import ManyinoneError

__all__ = ["FusedDecoderLayer", "FusedLayers", "fuse_layers"]

QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")


def _fuse(modules: Sequence[nn.Linear], leaf: str) -> torch.Tensor | None:
    """One buffer holding `leaf` ("weight"/"bias") of every module stacked along dim 0; each module's
    parameter becomes a view of it (same Parameter object, its .data re-pointed). None without biases."""
    params = [getattr(m, leaf) for m in modules]
    if all(p is None for p in params):
        return None
    if any(p is None for p in params):
        raise ManyinoneError(f"fused projections need a {leaf} on all of {len(modules)} modules or none")
    buffer = torch.cat([p.detach() for p in params], dim=0)
    row = 0
    for p in params:
        n = p.shape[0]
        p.data = buffer.narrow(0, row, n)  # the same Parameter (optimizers, hooks keep it), new storage
        row += n
    return buffer


class FusedDecoderLayer:
    """One LLaMA-layout decoder layer's decode forward over fused q/k/v and gate/up buffers; called
    as the runtime calls an HF layer (hidden, attention_mask=, position_ids=, use_cache=,
    position_embeddings=, and the cache under `cache` or `past_key_values`)."""

    def __init__(self, layer: nn.Module) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.layer, self.attn, self.mlp = layer, attn, mlp
        self.head_dim = attn.head_dim
        self.q_rows, self.kv_rows = attn.q_proj.out_features, attn.k_proj.out_features
        self.ffn = mlp.gate_proj.out_features
        self.qkv_weight = _fuse([getattr(attn, n) for n in QKV], "weight")  # [q + 2 kv, hidden]
        self.qkv_bias = _fuse([getattr(attn, n) for n in QKV], "bias")  # [q + 2 kv] or None
        self.gate_up_weight = _fuse([getattr(mlp, n) for n in GATE_UP], "weight")  # [2 ffn, hidden]
        self.gate_up_bias = _fuse([getattr(mlp, n) for n in GATE_UP], "bias")
        modeling = sys.modules[type(attn).__module__]  # the model's own rotary and attention functions
        self.rotate = modeling.apply_rotary_pos_emb
        self.eager_attention = modeling.eager_attention_forward

    def shares_storage(self) -> bool:
        """Whether every projection parameter is still a view of the fused buffers (a `.to()`, a
        `load_state_dict(assign=True)` or `restore()` re-homes them; the fused forward would then read stale values)."""
        def inside(p, buffer):
            start, size = buffer.data_ptr(), buffer.numel() * buffer.element_size()
            return start <= p.data_ptr() < start + size
        pairs = [(getattr(self.attn, n).weight, self.qkv_weight) for n in QKV]
        pairs += [(getattr(self.mlp, n).weight, self.gate_up_weight) for n in GATE_UP]
        if self.qkv_bias is not None:
            pairs += [(getattr(self.attn, n).bias, self.qkv_bias) for n in QKV]
        if self.gate_up_bias is not None:
            pairs += [(getattr(self.mlp, n).bias, self.gate_up_bias) for n in GATE_UP]
        return all(inside(p, b) for p, b in pairs)

    @staticmethod
    def _sections(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: int,
                  keep: int) -> torch.Tensor:
        """x [..., hidden] times the first `keep` rows of each of the sections of `rows` rows stacked in
        `weight` ([sections * rows, hidden]): [sections, ..., keep], one batched GEMM."""
        sections = weight.shape[0] // rows
        w = weight.view(sections, rows, weight.shape[1])[:, :keep]  # [sections, keep, hidden], a view
        flat = x.reshape(1, -1, x.shape[-1]).expand(sections, -1, -1)  # [sections, tokens, hidden]
        out = torch.bmm(flat, w.transpose(1, 2))  # [sections, tokens, keep]
        if bias is not None:
            out = out + bias.view(sections, rows)[:, None, :keep]
        return out.view(sections, *x.shape[:-1], keep)

    def attention(self, x: torch.Tensor, mask: torch.Tensor | None, rotary, cache) -> torch.Tensor:
        attn = self.attn
        shape = (*x.shape[:-1], -1, self.head_dim)
        q_keep, kv_keep = attn.q_proj.weight.shape[0], attn.k_proj.weight.shape[0]  # a plan's sliced views
        if q_keep == self.q_rows and kv_keep == self.kv_rows:  # full size: one GEMM over the whole buffer
            qkv = F.linear(x, self.qkv_weight, self.qkv_bias)  # [batch, q, q_rows + 2 kv_rows]
            q, k, v = qkv.split([self.q_rows, self.kv_rows, self.kv_rows], dim=-1)
        elif self.q_rows == self.kv_rows and q_keep == kv_keep:
            # Multi-head attention under a heads plan: q, k and v are three equal sections, so one
            # batched GEMM serves all three (the exported sub-model runs one GEMM here, not two).
            q, k, v = self._sections(x, self.qkv_weight, self.qkv_bias, self.q_rows, q_keep)
        else:
            bias = self.qkv_bias
            q = F.linear(x, self.qkv_weight[:q_keep], None if bias is None else bias[:q_keep])
            k, v = self._sections(x, self.qkv_weight[self.q_rows:], None if bias is None else bias[self.q_rows:],
                                  self.kv_rows, kv_keep)
        q, k, v = (t.reshape(shape).transpose(1, 2) for t in (q, k, v))  # [batch, heads, q, head_dim]
        cos, sin = rotary
        q, k = self.rotate(q, k, cos, sin)
        k, v = cache.update(k, v, attn.layer_idx)
        implementation = attn.config._attn_implementation
        function = self.eager_attention if implementation == "eager" else ALL_ATTENTION_FUNCTIONS[implementation]
        extra = {"sliding_window": attn.sliding_window} if getattr(attn, "sliding_window", None) else {}
        out, _ = function(attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling, **extra)
        return attn.o_proj(out.reshape(*x.shape[:-1], -1).contiguous())

    def feed_forward(self, x: torch.Tensor, unit_mask: torch.Tensor | None = None) -> torch.Tensor:
        mlp = self.mlp
        keep = mlp.gate_proj.weight.shape[0]
        if keep == self.ffn:
            gate, up = F.linear(x, self.gate_up_weight, self.gate_up_bias).chunk(2, dim=-1)
        else:
            gate, up = self._sections(x, self.gate_up_weight, self.gate_up_bias, self.ffn, keep)
        inner = mlp.act_fn(gate) * up  # [batch, q, keep]
        if unit_mask is not None:  # [batch, q or 1, ffn]: its prefix of the kept length, as the width axis's mask hook
            inner = inner * unit_mask[..., :keep].to(inner.dtype)
        return mlp.down_proj(inner)

    def __call__(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None, position_ids=None,
                 use_cache: bool = True, position_embeddings=None, cache=None, past_key_values=None,
                 unit_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`unit_mask`: per row (or token), a 0/1 scale of each MLP neuron (the token router's width masks),
        an argument rather than a module hook so that a compiled step takes it as an input."""
        layer = self.layer
        cache = cache if cache is not None else past_key_values
        hidden = hidden + self.attention(layer.input_layernorm(hidden), attention_mask, position_embeddings, cache)
        return hidden + self.feed_forward(layer.post_attention_layernorm(hidden), unit_mask)


class FusedLayers(list):
    """The fused forwards of a model's decoder layers (a list of `FusedDecoderLayer`), with `restore()`."""

    def shares_storage(self) -> bool:
        return all(f.shares_storage() for f in self)

    @torch.no_grad()
    def restore(self) -> None:
        """Give every fused parameter its own storage again (same values, same Parameter objects); the
        fused forwards are no longer usable afterwards (a runtime re-fuses when it is built)."""
        for fused in self:
            fused.layer.__dict__.pop("_manyinone_fused", None)
            for module, names in ((fused.attn, QKV), (fused.mlp, GATE_UP)):
                for name in names:
                    for leaf in ("weight", "bias"):
                        p = getattr(getattr(module, name), leaf)
                        if p is not None:
                            p.data = p.data.clone()


def fuse_layers(layers: Sequence[nn.Module]) -> FusedLayers:
    """Re-home q/k/v and gate/up of every layer into fused buffers (parameters become views of them)
    and return each layer's fused decode forward. Refuses a layer without the LLaMA layout."""
    for i, layer in enumerate(layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or not all(isinstance(getattr(attn, n, None), nn.Linear) for n in QKV) \
                or not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in (*GATE_UP, "down_proj")):
            raise ManyinoneError(f"decoder layer {i} ({type(layer).__name__}) lacks the LLaMA layout "
                                 "(self_attn.q/k/v_proj, mlp.gate/up/down_proj) the fused decode step needs")
    fused = FusedLayers()
    with torch.no_grad():
        for layer in layers:
            # Fused once per model: a second runtime on the same model reuses the buffers (re-fusing would
            # re-home the parameters and leave the first runtime's buffers stale).
            known = layer.__dict__.get("_manyinone_fused")
            if known is None or not known.shares_storage():
                known = layer.__dict__["_manyinone_fused"] = FusedDecoderLayer(layer)
            fused.append(known)
    return fused
