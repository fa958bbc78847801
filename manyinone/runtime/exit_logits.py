"""A checkpoint's per-exit heads, resolved once when a runtime is built into modules its decode steps call.

A checkpoint trained with exit heads (`train.exit_heads`: translators, own heads) gives each exit a
`LinearHead` (a frozen dataclass: norm + LM head weight) built on demand. A compiled decode step must
not build one inside its trace: dynamo (torch 2.11) fails on the fresh dataclass ("'LinearHead' object
has no attribute 'norm'"), and every step would rebuild it anyway. Here each exit's head becomes an
nn.Module holding the exit's norm module and weight (the same objects, no copy), so the step sees only
modules and tensors, as it does for the decoder layers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from manyinone.core.errors import ManyinoneError
from manyinone.train.lean_loss import LinearHead


class HeadModule(nn.Module):
    """`LinearHead` as a module: logits = norm(h) @ weight.T, the same ops in the same order as
    `LinearHead.__call__`, so its logits are bit-identical."""

    def __init__(self, head: LinearHead, depth: int) -> None:
        super().__init__()
        if not isinstance(head.norm, nn.Module):
            raise ManyinoneError(f"the exit head at depth {depth} has a {type(head.norm).__name__} norm; the runtime "
                                 "needs an nn.Module (an exit-head kind's linear_head must give one)")
        self.norm = head.norm
        self.weight = head.weight  # [vocab, hidden]; a Parameter is registered here as well, never copied

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(hidden), self.weight)  # [..., vocab]


class ExitLogits(nn.Module):
    """`exit_logits(depth, hidden)` for `LayerStack`: the exit's own head where it has one, else `shared`
    (the model's own final norm and LM head, what SoFT exits and the full depth use)."""

    def __init__(self, heads: Mapping[int, LinearHead], shared: Callable[[torch.Tensor], torch.Tensor],
                 layers: Mapping[int, nn.Module] | None = None) -> None:
        """`layers`: depth -> the exit's own decoder layer (exit_heads="layer"), which `LayerStack` runs on
        the exit's hidden states, with a KV cache of its own, before these heads."""
        super().__init__()
        self.heads = nn.ModuleDict({str(d): HeadModule(h, d) for d, h in sorted(heads.items())})
        self.depths = tuple(sorted(heads))  # plain ints: a step's depth is a constant, so the branch is resolved when traced
        self.shared = shared
        self.layers = dict(sorted((layers or {}).items()))  # the exit heads' own modules, not registered twice

    def forward(self, depth: int, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [..., vocab] (the head's dtype) of the exit after `depth` layers from hidden [..., hidden]."""
        if depth in self.depths:
            return self.heads[str(depth)](hidden)
        return self.shared(hidden)

    @classmethod
    def of(cls, nested) -> "ExitLogits":
        """The heads of an opened checkpoint (`io.api.NestedModel` with exit heads), moved to its model's
        device and dtype: one per depth-only exit spec (those `NestedModel.exit_logits` finds for
        SubnetSpec(depth=d)); every other depth exits through the adapter's own head, as there."""
        param = next(nested.model.parameters())
        heads = nested.exit_heads.to(device=param.device, dtype=param.dtype)
        exits = {s["depth"]: heads.linear_head(s) for s in heads.specs if set(s) == {"depth"}}
        return cls(exits, nested.adapter.exit_logits, {s["depth"]: heads.layers_of(s) for s in heads.with_layers()})
