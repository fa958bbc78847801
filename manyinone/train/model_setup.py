"""The model a training run trains: loaded (each rank its own shards under torchrun), exit modules
attached, sharded or moved to its device with the memory and speed levers on, and split into the
optimizer's parameter groups. `train.loop` calls these once per run, in this order."""

from __future__ import annotations

import torch

from manyinone.core.registry import adapter_for
from manyinone.io.loading import build_empty, load_pretrained, load_tokenizer, resolve_source
from manyinone.train import distributed, exit_heads, lora
from manyinone.train.config import TrainConfig


def load_model(cfg: TrainConfig, rt: distributed.Runtime, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer, peft model or None, adapter, space, exit modules or None) of the run."""
    # Under torchrun each rank reads only its own shards of the weight files (`load_sharded`). Else,
    # or where that cannot serve (a GGUF file), straight onto the GPU: transformers builds the model
    # on the meta device and fills it from the files, so no full copy sits in CPU memory.
    # Exit modules are copies of the model's own layers, norm and head, made before sharding so that
    # FSDP2 shards them with the rest: with them, each rank loads the whole model first.
    model = rt.load_sharded(cfg.model, dtype, device) if rt.distributed and cfg.exit_heads == "none" else None
    if model is not None:
        tokenizer = load_tokenizer(resolve_source(cfg.model))
    else:
        model, tokenizer = load_pretrained(cfg.model, dtype=dtype, device=device if device.type == "cuda" else None)
    tuned = lora.apply_lora(model, cfg.lora) if cfg.lora is not None else None  # `model` itself, adapters inside
    adapter = adapter_for(model, cfg.axes)
    adapter.check_axes(cfg.axes)
    space = adapter.space(cfg.axis_choices())
    exit_modules = None
    if cfg.exit_heads != "none":
        exit_modules = exit_heads.attach(model, exit_heads.for_adapter(adapter, cfg.exit_heads, space))
        if tuned is not None:  # copies of peft's frozen norm: they train, in float32 (the optimizer's master)
            exit_modules.float().requires_grad_(True)
    return model, tokenizer, tuned, adapter, space, exit_modules


def skeleton(cfg: TrainConfig, space, dtype: torch.dtype):
    """The trained model's shape, parameters on the meta device, exit modules attached: what the
    gathered weights of a sharded run fill on rank 0."""
    model = build_empty(cfg.model, dtype)
    if cfg.exit_heads != "none":
        exit_heads.attach(model, exit_heads.for_adapter(adapter_for(model, cfg.axes), cfg.exit_heads, space))
    return model


def place(model, adapter, cfg: TrainConfig, rt: distributed.Runtime, device: torch.device) -> list | None:
    """Shard (torchrun) or move the model, switch on training's memory and speed levers; returns the
    decoder layers for the levers that act per layer (None when none does)."""
    (rt.shard(model) if rt.distributed else model.to(device)).train()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = adapter.decoder_stack().layers if cfg.segment_lr_scales or cfg.layer_dropout or cfg.compile_layers \
        else None
    if cfg.compile_layers:
        # The layer's forward only, not its __call__: the exit-capture and layer-dropout hooks come and
        # go every step and would otherwise be guards that force a recompile.
        for layer in layers:
            layer.forward = torch.compile(layer.forward)
    return layers




def param_groups(model, heads, cfg: TrainConfig, layers=None) -> list[dict]:
    """Base weights at lr (frozen with freeze_base), exit modules at lr * exit_heads_lr_scale.

    With segment_lr_scales, the decoder layers after exit i-1 up to exit i train at lr * scales[i]
    (`layers`: the adapter's decoder layers, bottom first)."""
    own = {id(p) for p in heads.parameters()} if heads is not None else set()
    base = [p for p in model.parameters() if id(p) not in own and p.requires_grad]  # LoRA: the adapters only
    if cfg.freeze_base:
        for p in base:
            p.requires_grad_(False)
    groups = []
    if not cfg.freeze_base and cfg.segment_lr_scales is not None:
        bounds = [0, *cfg.exits]
        segments = [(scale, [p for layer in layers[lo:hi] for p in layer.parameters() if p.requires_grad])
                    for scale, lo, hi in zip(cfg.segment_lr_scales, bounds, bounds[1:])]
        in_segment = {id(p) for _, params in segments for p in params}
        groups = [{"params": params, "lr_scale": scale} for scale, params in segments if params]
        base = [p for p in base if id(p) not in in_segment]  # embeddings, final norm, head; layers past the last exit
    if not cfg.freeze_base:
        groups.insert(0, {"params": base, "lr_scale": 1.0})
    if heads is not None:
        # No weight decay: it would pull identity-initialised translators towards zero.
        # Exit blocks and layers are copies of body layers: they train at the body's rate, not the translators'.
        body = [*heads.blocks.parameters(), *heads.layers.parameters()]
        blocks = {id(p) for p in body}
        groups.append({"params": [p for p in heads.parameters() if id(p) not in blocks],
                       "lr_scale": cfg.exit_heads_lr_scale, "weight_decay": 0.0})
        if blocks:
            groups.append({"params": body, "lr_scale": 1.0, "weight_decay": 0.0})
    return groups
