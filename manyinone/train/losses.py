"""The nested-loss engine: one weighted loss over several sub-networks' outputs.

Pure functions of tensors. The caller hands in each spec's last hidden states at the supervised
positions only, plus the model's final norm and LM head as a callable; logits are materialised per
spec and only for those positions. Given a `LinearHead` (norm + head weight) instead, the
memory-lean path in `lean_loss.py` computes the same numbers without any [tokens, vocab] tensor
kept for backward.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from manyinone.core.space import SubnetSpec
from manyinone.core.errors import ManyinoneError
from manyinone.train.lean_loss import FrozenTeacher, LinearHead, fused_exit_loss


def exit_weights(specs: Sequence[SubnetSpec], weights: Sequence[float] | None) -> dict[SubnetSpec, float]:
    """Per-spec loss weights: all 1.0 (the paper's plain sum) or one explicit weight per spec."""
    if weights is None:
        return {s: 1.0 for s in specs}
    if len(weights) != len(specs) or any(w < 0 for w in weights):
        raise ManyinoneError(
            f"exit weights {list(weights)}: need {len(specs)} non-negative numbers, one per exit "
            f"{[s.label for s in specs]}"
        )
    return dict(zip(specs, map(float, weights)))


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy. logits [tokens, vocab], targets [tokens]."""
    return F.cross_entropy(logits.float(), targets, reduction="mean")


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean per-token KL(teacher || student) at `temperature`, scaled by T^2 (Hinton et al.).

    student_logits, teacher_logits: [tokens, vocab]; the teacher is detached here.
    """
    t = temperature
    teacher_logp = F.log_softmax(teacher_logits.detach().float() / t, dim=-1)  # [tokens, vocab]
    student_logp = F.log_softmax(student_logits.float() / t, dim=-1)  # [tokens, vocab]
    kl = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="none").sum(-1)  # [tokens]
    return kl.mean() * (t * t)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean per-token KL(student || teacher) at `temperature`, scaled by T^2: mode-seeking, the
    student is pushed to put its mass where the teacher's is (GKD's reverse direction)."""
    t = temperature
    teacher_logp = F.log_softmax(teacher_logits.detach().float() / t, dim=-1)  # [tokens, vocab]
    student_logp = F.log_softmax(student_logits.float() / t, dim=-1)  # [tokens, vocab]
    kl = F.kl_div(teacher_logp, student_logp, log_target=True, reduction="none").sum(-1)  # [tokens]
    return kl.mean() * (t * t)


@dataclass(frozen=True)
class TeacherTarget:
    """A frozen model's distribution at the supervised positions, and who learns from it.

    features: [tokens, teacher_hidden] after the teacher's final norm; weight: its LM head
    [vocab, teacher_hidden]. weights: spec -> weight of its KL term (missing = 0).
    """

    features: torch.Tensor
    weight: torch.Tensor
    weights: Mapping[SubnetSpec, float]
    temperature: float = 1.0
    reverse: bool = False

    def kl(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return (reverse_kl if self.reverse else distill_kl)(student_logits, teacher_logits, self.temperature)


@dataclass
class NestedLossOutput:
    total: torch.Tensor
    ce: dict[SubnetSpec, torch.Tensor]  # detached per-spec cross-entropy, for logging
    kl: dict[SubnetSpec, torch.Tensor]  # detached per-spec distillation term (empty if off)
    teacher_kl: dict[SubnetSpec, torch.Tensor] | None = None  # detached KL to a frozen teacher, specs it weighs (None if none)


def nested_loss(
    features: Mapping[SubnetSpec, torch.Tensor],
    head: Callable[[torch.Tensor], torch.Tensor] | Mapping[SubnetSpec, Callable[[torch.Tensor], torch.Tensor]],
    targets: torch.Tensor,
    weights: Mapping[SubnetSpec, float],
    teacher: SubnetSpec | None = None,
    distill_weight: float = 0.0,
    temperature: float = 1.0,
    chunk_rows: int | None = None,
    frozen: TeacherTarget | None = None,
) -> NestedLossOutput:
    """sum_s w_s * (CE_s + distill_weight * KL(teacher || s)) + sum_s f_s * KL_frozen(s).

    features: spec -> [tokens, hidden] features at supervised positions; targets: [tokens].
    head: the exit head (norm + LM head) as a callable, or a `LinearHead` for the memory-lean
    path (same numbers, chunks of `chunk_rows` tokens, no logits kept for backward); or a mapping
    spec -> head when exits have their own heads (manyinone.train.exit_heads).
    The teacher (normally the full spec) gets no distillation term itself; if it was not sampled
    this step, distillation is skipped for the step.
    frozen: a frozen teacher model's features and head; spec s adds frozen.weights[s] times its KL
    towards that distribution (forward or reverse, at its own temperature).
    """
    use_kd = distill_weight > 0 and teacher is not None and teacher in features
    heads = head if isinstance(head, Mapping) else {s: head for s in features}
    if all(isinstance(heads[s], LinearHead) for s in features):
        return _lean_nested_loss(features, heads, targets, weights, teacher if use_kd else None,
                                 distill_weight, temperature, chunk_rows, frozen)
    # The teacher's logits serve both its own CE and, detached, every other spec's target.
    teacher_logits = heads[teacher](features[teacher]) if use_kd else None  # [tokens, vocab]
    total = torch.zeros((), device=targets.device)
    ce_parts: dict[SubnetSpec, torch.Tensor] = {}
    kl_parts: dict[SubnetSpec, torch.Tensor] = {}
    frozen_parts: dict[SubnetSpec, torch.Tensor] = {}
    frozen_logits = frozen.features @ frozen.weight.t() if frozen is not None else None  # [tokens, vocab]
    for spec, feats in features.items():
        logits = teacher_logits if use_kd and spec == teacher else heads[spec](feats)  # [tokens, vocab]
        ce = token_cross_entropy(logits, targets)
        term = ce
        if use_kd and spec != teacher:
            kl = distill_kl(logits, teacher_logits, temperature)
            kl_parts[spec] = kl.detach()
            term = term + distill_weight * kl
        total = total + weights.get(spec, 1.0) * term
        if frozen is not None and frozen.weights.get(spec, 0.0) > 0:
            kl = frozen.kl(logits, frozen_logits)
            frozen_parts[spec] = kl.detach()
            total = total + frozen.weights.get(spec, 0.0) * kl
        ce_parts[spec] = ce.detach()
    return NestedLossOutput(total=total, ce=ce_parts, kl=kl_parts, teacher_kl=frozen_parts if frozen is not None else None)


def nested_loss_on_positions(
    features: Mapping[SubnetSpec, torch.Tensor],
    head,
    targets: torch.Tensor,
    weights: Mapping[SubnetSpec, float],
    full: SubnetSpec,
    keep: torch.Tensor,
    distill_weight: float = 0.0,
    temperature: float = 1.0,
    frozen: TeacherTarget | None = None,
) -> NestedLossOutput:
    """`nested_loss` with the full spec on every position and every other spec on positions `keep` only.

    keep: [kept] indices into the tokens. The exits' head matmuls over the vocabulary dominate the
    loss's cost, so a subset cuts step time; the full depth, what the model is for, keeps every
    token. Self-distillation compares each exit with the full depth's logits at the kept positions.
    """
    only_full = {full: features[full]}
    frozen_full = None if frozen is None else replace(frozen, weights={full: frozen.weights.get(full, 0.0)})
    whole = nested_loss(only_full, head, targets, {full: weights.get(full, 1.0)}, frozen=frozen_full)
    subset = {s: f[keep] for s, f in features.items()}  # [kept, hidden] each; the full one is the KD target
    frozen_sub = None if frozen is None else replace(
        frozen, features=frozen.features[keep], weights={s: w for s, w in frozen.weights.items() if s != full})
    part = nested_loss(subset, head, targets[keep], {**weights, full: 0.0}, teacher=full,
                       distill_weight=distill_weight, temperature=temperature, frozen=frozen_sub)
    teacher_kl = None if frozen is None else {**(part.teacher_kl or {}), **(whole.teacher_kl or {})}
    return NestedLossOutput(total=whole.total + part.total, ce={**part.ce, full: whole.ce[full]}, kl=part.kl,
                            teacher_kl=teacher_kl)


def _lean_nested_loss(features, heads: Mapping[SubnetSpec, LinearHead], targets, weights, teacher, distill_weight,
                      temperature, chunk_rows, frozen: TeacherTarget | None) -> NestedLossOutput:
    specs = list(features)
    normed = [heads[s].norm(features[s]) for s in specs]  # each [tokens, hidden]
    lean_frozen = None if frozen is None else FrozenTeacher(
        frozen.features, frozen.weight, tuple(frozen.weights.get(s, 0.0) for s in specs), frozen.temperature,
        frozen.reverse)
    out = fused_exit_loss(
        normed, [heads[s].weight for s in specs], targets, [weights.get(s, 1.0) for s in specs],
        teacher=specs.index(teacher) if teacher is not None else None,
        distill_weight=distill_weight, temperature=temperature, chunk_rows=chunk_rows, frozen=lean_frozen,
    )
    kl_parts = {s: out.kl[i] for i, s in enumerate(specs) if teacher is not None and s != teacher}
    frozen_parts = None if frozen is None else {s: out.teacher_kl[i] for i, s in enumerate(specs)
                                                if frozen.weights.get(s, 0.0) > 0}
    return NestedLossOutput(total=out.total, ce={s: out.ce[i] for i, s in enumerate(specs)}, kl=kl_parts,
                            teacher_kl=frozen_parts)


def supervised_positions(hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """Features that predict a supervised next token, and those tokens.

    hidden: [batch, seq, hidden]; labels: [batch, seq] (HF convention, unshifted).
    Returns ([tokens, hidden], [tokens]): position t predicts labels[t + 1].
    """
    mask = labels[:, 1:] != ignore_index  # [batch, seq-1]
    return hidden[:, :-1][mask], labels[:, 1:][mask]
