"""Per-exit modules between an exit's hidden state and the vocabulary.

Four kinds, all optional (plain SoFT shares the model's own final norm and LM head at every exit),
each registered in `core.registry.EXIT_HEAD_KINDS` (a new kind is one more registered class with
the same three methods; its `linear_head` gives a LinearHead whose norm is an nn.Module, which the
decode runtime holds in its compiled steps):

- "translator" (manyinone's recipe, after the tuned lens of Belrose et al. 2023): each exit gets
  its own copy of the final norm and an H x H linear map, initialised to the identity, between
  that norm and the shared LM head: logits = head(T_k · norm_k(h)). It costs H^2 parameters per
  exit, takes the burden of "look like the last layer" off the shared layers, and folds into an
  untied LM head (head · T_k) when a sub-model is exported, so exports stay plain HF models.
- "head" (the SFT + early-exit heads baseline, the Sorted-LLaMA paper's SFT+ICT): each exit gets
  its own copy of the final norm and of the whole LM head, trained on a frozen model.
- "block" (a capacity lever for agreement, after Kangaroo's exit adapter, position-wise): a
  translator with the feed-forward half of one decoder layer before it, h + mlp(norm(h)), copied
  from the first layer the exit skips with its down projection zeroed, so it starts as the plain
  translator. It exports as one more decoder layer whose attention output projection is zero, so
  exports stay plain HF models; being position-wise, it needs no KV cache in the runtime.
- "layer" (Kangaroo's exit adapter itself: attention as well): a translator with one whole decoder
  layer before it, copied from the first layer the exit skips with its attention output and down
  projections zeroed, so it too starts as the plain translator. It runs on the exit's hidden states
  with the call arguments (mask, positions, rotary) of the exit's last layer (`forward_nested`) and
  exports as that decoder layer. In the decode runtime its attention has a KV-cache buffer of its own
  (`runtime.stack.LayerStack.exit_layers`); speculation fills it at every position the draft may read.

The full depth never gets exit modules: it stays the model's own forward.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from manyinone.core.space import SubnetSpec
from manyinone.core.errors import ManyinoneError, resource_error
from manyinone.core.kinds import EXIT_HEAD_KINDS
from manyinone.train.lean_loss import LinearHead

FILE = "exit_heads.safetensors"


class TranslatedNorm(nn.Module):
    """T_k · norm_k(h), [..., hidden] -> [..., hidden]: a translator exit's features before the shared LM head.

    A module rather than a closure, so that a decode runtime can hold every exit's head as modules and
    tensors that torch.compile traces like any other layer (manyinone.runtime.exit_logits)."""

    def __init__(self, norm: nn.Module, translator: torch.Tensor) -> None:
        super().__init__()
        self.norm = norm
        self.translator = translator  # [hidden, hidden]: ExitHeads' own parameter, referenced, not copied

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # F.linear(x, T) computes x @ T.T, i.e. T applied to each row.
        return nn.functional.linear(self.norm(hidden), self.translator.to(hidden.dtype))


@EXIT_HEAD_KINDS.register("translator")
class Translator:
    """own norm + identity-initialised HxH map before the shared LM head, folded into exports"""

    @staticmethod
    def initial_map(head_weight: torch.Tensor) -> torch.Tensor:
        hidden = head_weight.shape[1]
        return torch.eye(hidden, dtype=head_weight.dtype, device=head_weight.device)  # [hidden, hidden]

    @staticmethod
    def linear_head(norm: nn.Module, weight: torch.Tensor, shared: torch.Tensor) -> LinearHead:
        return LinearHead(norm=TranslatedNorm(norm, weight), weight=shared)

    @staticmethod
    def folded_weight(weight: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        return (shared.double() @ weight.double()).to(weight.dtype).detach()  # [vocab, hidden]


class ResidualMLP(nn.Module):
    """h + mlp(norm(h)), [..., hidden] -> [..., hidden]: a decoder layer's feed-forward half, an exit's own."""

    def __init__(self, norm: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.norm, self.mlp = norm, mlp

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.mlp(self.norm(hidden))


@EXIT_HEAD_KINDS.register("head")
class OwnHead:
    """own norm + own LM head, the SFT+heads baseline"""

    @staticmethod
    def initial_map(head_weight: torch.Tensor) -> torch.Tensor:
        return head_weight.detach().clone()  # [vocab, hidden]

    @staticmethod
    def linear_head(norm: nn.Module, weight: torch.Tensor, shared: torch.Tensor) -> LinearHead:
        return LinearHead(norm=norm, weight=weight)

    @staticmethod
    def folded_weight(weight: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        return weight.detach().clone()


@EXIT_HEAD_KINDS.register("block")
class Block(Translator):
    """own feed-forward block (h + mlp(norm(h)), from the next layer, zero-initialised output) + translator; exports as one more layer"""

    needs_block = True


@EXIT_HEAD_KINDS.register("layer")
class Layer(Translator):
    """own decoder layer (attention + MLP, from the next layer, zero-initialised outputs) + translator; exports as one more layer"""

    needs_layer = True


def _key(spec: SubnetSpec) -> str:
    return spec.label.replace("=", "_").replace(",", "__")  # module names may not hold '=' or ','


class ExitHeads(nn.Module):
    """Exit modules for `specs` (never the full one), initialised from the model's final `norm` and
    LM head weight `head_weight` ([vocab, hidden]; shared, not copied, by translators).

    Call `linear_head(spec)` for the LinearHead an exit's loss and logits go through, `fold(sub, spec)`
    to turn an extracted sub-model into one that computes the same logits with plain HF modules.
    """

    def __init__(self, kind: str, specs: Iterable[SubnetSpec], norm: nn.Module, head_weight: torch.Tensor,
                 make_block: Callable[[int], object] | None = None,
                 shared_head: Callable[[], torch.Tensor] | None = None) -> None:
        """`make_block(depth)`: the adapter's `exit_block` ((norm, mlp)) for kind "block", its
        `exit_layer` (a decoder layer) for kind "layer" (`block_maker` picks it). `shared_head()`: the
        model's head weight as it is now (default `head_weight` itself); FSDP2 replaces the parameter
        when it shards the model, and swaps the unsharded one in during the forward."""
        super().__init__()
        if kind not in EXIT_HEAD_KINDS.names():
            raise ManyinoneError(f"exit_heads {kind!r} unknown; allowed {list(EXIT_HEAD_KINDS.names())} (or none)")
        self.kind, self._rule = kind, EXIT_HEAD_KINDS.get(kind)
        self.specs = list(specs)
        self.norms = nn.ModuleDict({_key(s): copy.deepcopy(norm) for s in self.specs})
        self.maps = nn.ParameterDict({_key(s): nn.Parameter(self._rule.initial_map(head_weight)) for s in self.specs})
        self.blocks = nn.ModuleDict(self._per_exit(make_block, "blocks", lambda parts: ResidualMLP(*parts))
                                    if has_blocks(kind) else {})
        self.layers = nn.ModuleDict(self._per_exit(make_block, "layers", lambda layer: layer)
                                    if has_layers(kind) else {})
        self._shared = shared_head or (lambda: head_weight)  # a function: not registered as our parameter

    def _per_exit(self, make: Callable[[int], object] | None, what: str,
                  build: Callable[[object], nn.Module]) -> dict[str, nn.Module]:
        """Per exit, `build` of what the adapter's `make(depth)` copies from the first layer the exit skips
        (its block's (norm, mlp), or its decoder layer): trainable modules, depth exits only."""
        if make is None:
            raise ManyinoneError(f"exit_heads={self.kind!r} needs the model's adapter to build its {what}")
        modules = {}
        for s in self.specs:
            if set(s) != {"depth"}:
                raise ManyinoneError(f"exit_heads={self.kind!r} serves depth exits only; got {s.label}")
            modules[_key(s)] = build(make(s["depth"])).requires_grad_(True)
        return modules

    def with_blocks(self) -> list[SubnetSpec]:
        """The exits that run a block or a layer of their own: one decoder layer more than their depth
        once exported."""
        return [s for s in self.specs if _key(s) in self.blocks or _key(s) in self.layers]

    def with_layers(self) -> list[SubnetSpec]:
        """The exits with a decoder layer of their own (kind "layer"), which need their own KV cache."""
        return [s for s in self.specs if _key(s) in self.layers]

    def layers_of(self, spec: SubnetSpec) -> nn.Module:
        """The exit's own decoder layer (kind "layer")."""
        return self.layers[_key(spec)]

    def run_layer(self, spec: SubnetSpec, hidden: torch.Tensor, call: dict) -> torch.Tensor:
        """The exit's own decoder layer on its hidden states [batch, seq, hidden], called with `call`, the
        keyword arguments its last layer was called with (mask, positions, rotary)."""
        out = self.layers[_key(spec)](hidden, **{k: v for k, v in call.items() if k != "hidden_states"})
        return out[0] if isinstance(out, tuple) else out  # transformers < 5 returns a tuple

    def __contains__(self, spec: SubnetSpec) -> bool:
        return _key(spec) in self.norms

    def heads_for(self, specs: Iterable[SubnetSpec], shared: LinearHead) -> dict[SubnetSpec, LinearHead]:
        """spec -> the head its loss and logits go through (`shared` for specs without exit modules)."""
        return {s: self.linear_head(s) if s in self else shared for s in specs}

    def linear_head(self, spec: SubnetSpec) -> LinearHead:
        """The exit's norm (+ translator) and head weight: logits = LinearHead(...)(hidden)."""
        key = _key(spec)
        norm = nn.Sequential(self.blocks[key], self.norms[key]) if key in self.blocks else self.norms[key]
        return self._rule.linear_head(norm, self.maps[key], self._shared())

    def folded_head_weight(self, spec: SubnetSpec) -> torch.Tensor:
        """[vocab, hidden]: one matrix giving the same logits from norm_k(h) as the exit's head."""
        return self._rule.folded_weight(self.maps[_key(spec)], self._shared())

    def fold(self, sub: nn.Module, spec: SubnetSpec, norm_path: str,
             append_block: Callable[[nn.Module, nn.Module, nn.Module], None] | None = None,
             append_layer: Callable[[nn.Module, nn.Module], None] | None = None) -> nn.Module:
        """Give extracted sub-model `sub` this exit's norm (at `norm_path`) and an untied LM head."""
        # A fresh module, never a copy into the old one: extracted sub-models share their tensors
        # with the full model, so writing into the norm's weight would change the full model too.
        parent, _, leaf = norm_path.rpartition(".")
        setattr(sub.get_submodule(parent) if parent else sub, leaf, copy.deepcopy(self.norms[_key(spec)]))
        if _key(spec) in self.blocks:  # before the norm: the block runs between the last layer and it
            if append_block is None:
                raise ManyinoneError(f"exit {spec.label} has an exit block; folding it needs the adapter's append_exit_block")
            block = self.blocks[_key(spec)]
            append_block(sub, block.norm, block.mlp)
        if _key(spec) in self.layers:  # likewise, as the exit's own decoder layer
            if append_layer is None:
                raise ManyinoneError(f"exit {spec.label} has an exit layer; folding it needs the adapter's "
                                     "append_exit_layer")
            append_layer(sub, self.layers[_key(spec)])
        head = sub.get_output_embeddings()
        head.weight = nn.Parameter(self.folded_head_weight(spec).to(head.weight.device), requires_grad=False)
        sub.config.tie_word_embeddings = False
        if hasattr(sub.config, "get_text_config"):  # composite configs keep the flag on the text part
            sub.config.get_text_config().tie_word_embeddings = False
        return sub

    # --- files --------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> dict:
        """Write FILE into `folder`; returns the index entry that records it."""
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(Path(folder) / FILE), metadata={"kind": self.kind})
        return {"file": FILE, "kind": self.kind, "specs": [s.to_dict() for s in self.specs]}

    @classmethod
    def load(cls, folder: str | Path, entry: dict, norm: nn.Module, head_weight: torch.Tensor,
             make_block: Callable[[int], tuple[nn.Module, nn.Module]] | None = None) -> ExitHeads:
        name = entry.get("file", FILE)
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise ManyinoneError(f"checkpoint {str(folder)!r} names exit heads file {name!r}, which is not a file "
                                 "name inside the checkpoint")
        path = Path(folder) / name
        try:
            heads = cls(entry["kind"], [SubnetSpec(s) for s in entry["specs"]], norm, head_weight, make_block)
            state = load_file(str(path), device=str(head_weight.device))
            heads.load_state_dict({k: v.to(head_weight.dtype) for k, v in state.items()})
        except ManyinoneError:
            raise
        except Exception as exc:  # missing file, damaged header, wrong shapes
            raise resource_error(exc, f"loading exit heads {str(path)!r}") or ManyinoneError(f"exit heads {str(path)!r} missing or corrupt ({type(exc).__name__}); "
                                 "the checkpoint is incomplete") from None
        return heads


def has_blocks(kind: str) -> bool:
    """Whether registered exit-head `kind` puts a feed-forward block before each exit's head."""
    return getattr(EXIT_HEAD_KINDS.get(kind), "needs_block", False)


def has_layers(kind: str) -> bool:
    """Whether registered exit-head `kind` puts a decoder layer of its own before each exit's head."""
    return getattr(EXIT_HEAD_KINDS.get(kind), "needs_layer", False)


def block_maker(adapter, kind: str) -> Callable[[int], object] | None:
    """The adapter's `exit_block` when exit-head `kind` has blocks, its `exit_layer` when it has layers
    (None otherwise)."""
    return adapter.exit_block if has_blocks(kind) else adapter.exit_layer if has_layers(kind) else None


def forward_nested(adapter, heads: ExitHeads | None, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   specs, **kwargs) -> dict[SubnetSpec, torch.Tensor]:
    """`adapter.forward_nested`, with each exit that has a decoder layer of its own read after that layer.

    The exit's layer runs after the forward, outside it (so activation checkpointing never recomputes
    it), with the keyword arguments the exit's last decoder layer was called with: the model's own
    attention mask (padding, or packed rows' blocks), positions and rotary embeddings."""
    own = set(heads.with_layers()) if heads is not None else set()
    layered = [s for s in specs if s in own]
    if not layered:
        return adapter.forward_nested(input_ids, attention_mask, specs, **kwargs)
    layers = adapter.decoder_stack().layers
    calls: dict[int, dict] = {}

    def keep(depth: int):
        def hook(_module, _args, call, _output):
            calls.setdefault(depth, call)  # the first call: a recompute under checkpointing passes the same
        return hook

    handles = [layers[s["depth"] - 1].register_forward_hook(keep(s["depth"]), with_kwargs=True) for s in layered]
    try:
        hidden = adapter.forward_nested(input_ids, attention_mask, specs, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return {**hidden, **{s: heads.run_layer(s, hidden[s], calls[s["depth"]]) for s in layered}}


def for_adapter(adapter, kind: str, space) -> ExitHeads:
    """ExitHeads for every non-full spec of `space`, initialised from the adapter's own norm and head."""
    head = adapter.linear_head()
    if head is None or not isinstance(head.norm, nn.Module):
        raise ManyinoneError(f"exit_heads={kind!r} needs a norm + linear LM head; the {adapter.name!r} adapter has none")
    return ExitHeads(kind, [s for s in space.specs() if s != space.full()], head.norm, head.weight,
                     block_maker(adapter, kind), shared_head=lambda: adapter.linear_head().weight)


ATTRIBUTE = "manyinone_exit_heads"


def attach(model: nn.Module, heads: ExitHeads) -> ExitHeads:
    """Hang `heads` on the model while it trains, so device moves, the optimizer, gradient clipping
    and the resumable state (model.safetensors of each step) all include them with no extra code."""
    model.add_module(ATTRIBUTE, heads)
    return heads


@contextmanager
def detached(model: nn.Module) -> Iterator[ExitHeads | None]:
    """Take the attached heads off for a plain HF save (its weights file must hold only HF tensors)."""
    heads = getattr(model, ATTRIBUTE, None)
    if heads is None:
        yield None
        return
    delattr(model, ATTRIBUTE)
    try:
        yield heads
    finally:
        model.add_module(ATTRIBUTE, heads)


def module_path(model: nn.Module, module: object) -> str:
    """The dotted name of `module` inside `model` (how an exit's norm is found in a sub-model)."""
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise ManyinoneError(f"{type(module).__name__} is not a submodule of {type(model).__name__}")
