"""One micro-batch's pieces of the training step: the frozen teacher's target, layer dropout, every exit's
loss, and the step's metrics. Pure of the loop's state: `train.loop` calls them in order."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from manyinone.train.config import TrainConfig
from manyinone.train.layer_dropout import dropped_layers, keep_masks, layer_rates
from manyinone.train.losses import (NestedLossOutput, TeacherTarget, nested_loss, nested_loss_on_positions,
                                    supervised_positions)


def teacher_target(teacher, batch, autocast, weights, cfg: TrainConfig) -> TeacherTarget:
    """The frozen teacher's distribution at the supervised positions of `batch`."""
    with autocast:
        t_feats, _ = supervised_positions(teacher.hidden(batch["input_ids"], batch.get("attention_mask"),
                                                         batch.get("position_ids")),
                                          batch["labels"])  # [tokens, teacher_hidden]
    return TeacherTarget(t_feats, teacher.head_weight, weights, cfg.teacher_temperature, cfg.teacher_kl == "reverse")


def layer_dropout(cfg: TrainConfig, layers, step: int, micro: int, rows: int):
    """LayerSkip-style skipping for this micro-batch (a no-op context without layer_dropout); the masks
    come from (seed, step, micro), so a resume draws the same ones."""
    if not cfg.layer_dropout:
        return nullcontext()
    draws = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 1_009 + micro)
    return dropped_layers(layers, keep_masks(layer_rates(len(layers), cfg.layer_dropout), rows, draws))


def exit_losses(cfg: TrainConfig, adapter, space, exit_modules, weights, hidden, labels, teacher_target,
                 step: int, micro: int) -> NestedLossOutput:
    """Every sampled exit's loss from its hidden states [batch, seq, hidden] (through its own head, if any)."""
    feats, targets = {}, None
    for spec, h in hidden.items():
        feats[spec], targets = supervised_positions(h, labels)
    head = (cfg.loss_impl == "lean" and adapter.linear_head()) or adapter.exit_logits
    if exit_modules is not None:  # exits with their own modules; the full depth keeps the model's head
        head = exit_modules.heads_for(feats, head)
    full = space.full()
    if cfg.exit_positions < 1 and len(feats) > 1 and full in feats:
        picks = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 1_013 + micro)
        kept = max(1, math.ceil(cfg.exit_positions * targets.numel()))
        keep = torch.randperm(targets.numel(), generator=picks)[:kept].to(targets.device)  # [kept]
        return nested_loss_on_positions(feats, head, targets, weights, full, keep, cfg.distill_weight,
                                        cfg.distill_temperature, teacher_target)
    return nested_loss(feats, head, targets, weights, teacher=full, distill_weight=cfg.distill_weight,
                       temperature=cfg.distill_temperature, frozen=teacher_target)


def add_to_sums(sums: dict[str, float], out: NestedLossOutput, grad_accum: int) -> None:
    """Add one micro-batch's per-exit terms to the step's metrics (means over the micro-batches).
    .item() is a device sync; once per micro-batch is negligible next to the step."""
    terms = [*((f"ce/{s.label}", v) for s, v in out.ce.items()), *((f"kl/{s.label}", v) for s, v in out.kl.items()),
             *((f"teacher_kl/{s.label}", v) for s, v in (out.teacher_kl or {}).items()), ("loss", out.total)]
    for key, value in terms:
        sums[key] = sums.get(key, 0.0) + value.item() / grad_accum
