"""Memory-lean nested loss: every exit's cross-entropy (and self-distillation) without [tokens, vocab] tensors.

The plain loss calls the LM head once per exit and keeps each exit's float32 logits, their softmax
and their gradient alive until backward: with 5 exits that dominates a small model's memory. Here
one autograd Function walks the tokens in chunks; per chunk it computes each exit's logits, the
loss and, right away, the gradients with respect to the exit's features and the head weight
(what a fused linear + cross-entropy does). Only those gradients, [tokens, hidden] per exit and
one float32 [vocab, hidden] accumulator per distinct head, live until backward, where they are
scaled by the incoming gradient. No logits are recomputed, so the FLOPs equal the plain loss's.

Numbers equal the plain path (`losses.nested_loss` with a callable head): same casts (the matmul in
the autocast dtype, softmax in float32), same mean over tokens, same KL(teacher || student) * T^2.

A frozen external teacher (another model, `FrozenTeacher`) is handled the same way: its final
hidden states come in, its logits are made chunk by chunk beside the exits', and each exit adds a
weighted KL towards it (forward or reverse) without any [tokens, vocab] tensor kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

# Rows per chunk are chosen so one float32 [rows, vocab] block is about this large; two to five
# such blocks are alive at once inside the loop (logits, gradient, teacher distribution). Larger
# chunks mean fewer passes over the float32 [vocab, hidden] gradient accumulator.
CHUNK_BYTES = 256 * 2**20


@dataclass(frozen=True)
class LinearHead:
    """An exit head that is a norm then one bias-free linear map: logits = norm(h) @ weight.T.

    weight: [vocab, hidden]. Calling it gives the same logits as the model's own head, so a
    LinearHead also serves the plain loss. Fetch it after the forward pass: FSDP2 swaps in the
    unsharded weight during forward.
    """

    norm: Callable[[torch.Tensor], torch.Tensor]
    weight: torch.Tensor

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(hidden), self.weight)  # [..., vocab]


@dataclass(frozen=True)
class FrozenTeacher:
    """A frozen model's distribution as a distillation target for every exit.

    features: [tokens, teacher_hidden] after the teacher's own final norm; weight: its LM head
    [vocab, teacher_hidden]; neither gets a gradient. weights: the KL term's weight per exit (0 =
    none). reverse: KL(exit || teacher) instead of KL(teacher || exit). Scaled by T^2 like self-KD.
    """

    features: torch.Tensor
    weight: torch.Tensor
    weights: tuple[float, ...]
    temperature: float = 1.0
    reverse: bool = False

    def logits(self) -> torch.Tensor:
        return F.linear(self.features, self.weight)  # [tokens, vocab]


class ExitLosses(NamedTuple):
    total: torch.Tensor  # float32 scalar
    ce: torch.Tensor  # [exits], detached
    kl: torch.Tensor  # [exits], self-distillation KL, detached (zeros if off)
    teacher_kl: torch.Tensor  # [exits], KL to the frozen teacher, detached (zeros if none)


def kl_and_grad(student_logp: torch.Tensor, teacher_logp: torch.Tensor, teacher_p: torch.Tensor, reverse: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-chunk KL sum and d(KL)/d(student logits / T), for rows of log-probabilities [c, vocab].

    forward KL(p_t || q): gradient q - p_t. reverse KL(q || p_t): gradient q * (log q - log p_t - KL_row).
    student_logp is consumed (overwritten) to save one [c, vocab] block.
    """
    q = student_logp.exp()  # [c, vocab]
    if not reverse:
        kl = (teacher_p * (teacher_logp - student_logp)).sum()
        return kl, q.sub_(teacher_p)
    log_ratio = student_logp.sub_(teacher_logp)  # [c, vocab]
    row_kl = (q * log_ratio).sum(-1, keepdim=True)  # [c, 1]
    return row_kl.sum(), q.mul_(log_ratio.sub_(row_kl))


@dataclass(frozen=True)
class LeanPlan:
    """What the fused Function computes; plain data so forward/backward stay readable."""

    head_of: tuple[int, ...]  # exit i uses unique head weight head_of[i]
    loss_weights: tuple[float, ...]  # w_i per exit
    teacher: int | None  # exit index whose logits are the distillation target; None = no distillation
    distill_weight: float
    temperature: float
    chunk_rows: int
    dtype: torch.dtype  # matmul dtype (the autocast dtype, else the promoted input dtype)
    frozen_weights: tuple[float, ...] | None = None  # per-exit weight of KL to a frozen teacher; None = no teacher
    frozen_temperature: float = 1.0
    frozen_reverse: bool = False


def default_chunk_rows(vocab: int) -> int:
    return max(16, CHUNK_BYTES // (4 * vocab))


def _accumulate_matmul(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc + a @ b for a float32 `acc` and half-precision a, b: on CUDA in one GEMM with a float32
    output (no rounded [vocab, hidden] intermediate); elsewhere through a temporary."""
    if acc.is_cuda and a.dtype != acc.dtype:
        try:
            return torch.addmm(acc, a, b, out_dtype=acc.dtype)
        except (RuntimeError, TypeError):  # torch without addmm(out_dtype=...)
            pass
    return acc.add_(a @ b)


def _matmul_dtype(x: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(x.dtype, w.dtype)


class _FusedExitLoss(torch.autograd.Function):
    """sum_i w_i * (CE_i + distill_weight * KL(teacher || i)); gradients computed in forward.

    Inputs after (plan, targets): the exits' normed features [tokens, hidden] each, then the
    distinct head weights [vocab, hidden], then (with a frozen teacher) its features and head weight.
    Outputs: the total (float32 scalar) and a detached [3, exits] tensor of per-exit CE, self-KD KL
    and frozen-teacher KL for logging.
    """

    @staticmethod
    def forward(ctx, plan: LeanPlan, targets: torch.Tensor, *tensors: torch.Tensor):
        n_exits = len(plan.head_of)
        n_heads = max(plan.head_of) + 1
        feats, heads = tensors[:n_exits], tensors[n_exits:n_exits + n_heads]
        frozen = tensors[n_exits + n_heads:]  # () or (teacher features [tokens, th], teacher head [vocab, th])
        need = ctx.needs_input_grad[2:2 + n_exits + n_heads]
        want_grad = any(need)
        tokens = targets.numel()
        dt, temp = plan.dtype, plan.temperature
        heads_dt = [w.to(dt) for w in heads]  # one cast per call, not per chunk
        grad_feats = [torch.empty_like(f) if need[i] else None for i, f in enumerate(feats)]
        grad_heads = [torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need[n_exits + j] else None
                      for j, w in enumerate(heads)]
        ce_sum = torch.zeros(n_exits, dtype=torch.float32, device=targets.device)
        kl_sum = torch.zeros(n_exits, dtype=torch.float32, device=targets.device)
        frozen_sum = torch.zeros(n_exits, dtype=torch.float32, device=targets.device)
        frozen_head = frozen[1].to(dt) if frozen else None
        t_frozen = plan.frozen_temperature
        # The teacher goes first: its distribution must be read before its logits are reused in place.
        order = sorted(range(n_exits), key=lambda i: i != plan.teacher)
        with torch.autocast(targets.device.type, enabled=False):
            for start in range(0, tokens, plan.chunk_rows):
                rows = slice(start, start + plan.chunk_rows)
                tgt = targets[rows]  # [c]
                arange = torch.arange(tgt.numel(), device=tgt.device)
                teacher_p = teacher_logp = None
                if frozen:
                    frozen_logits = F.linear(frozen[0][rows].to(dt), frozen_head).float()  # [c, vocab]
                    frozen_logp = torch.log_softmax(frozen_logits.div_(t_frozen), dim=-1)  # [c, vocab]
                    frozen_p = frozen_logp.exp()  # [c, vocab]
                    del frozen_logits
                for i in order:
                    x = feats[i][rows].to(dt)  # [c, hidden]
                    w_dt = heads_dt[plan.head_of[i]]
                    logits = F.linear(x, w_dt).float()  # [c, vocab]
                    weight = plan.loss_weights[i]
                    coef = None
                    if plan.teacher is not None and i == plan.teacher:
                        teacher_logp = torch.log_softmax(logits / temp, dim=-1)  # [c, vocab]
                        teacher_p = teacher_logp.exp()  # [c, vocab]
                    elif plan.teacher is not None:
                        student_logp = torch.log_softmax(logits / temp, dim=-1)  # [c, vocab]
                        kl_sum[i] += (teacher_p * (teacher_logp - student_logp)).sum()
                        # d(T^2 * KL)/d logits = T * (softmax(z/T) - p_teacher), per token.
                        coef = student_logp.exp_().sub_(teacher_p)  # [c, vocab]
                    frozen_coef = None
                    if frozen and plan.frozen_weights[i] > 0:
                        student_logp = torch.log_softmax(logits / t_frozen, dim=-1)  # [c, vocab]
                        kl, frozen_coef = kl_and_grad(student_logp, frozen_logp, frozen_p, plan.frozen_reverse)
                        frozen_sum[i] += kl
                    target_logit = logits.gather(1, tgt[:, None]).squeeze(1)  # [c]
                    lse = torch.logsumexp(logits, dim=-1)  # [c]
                    ce_sum[i] += (lse - target_logit).sum()
                    if not want_grad:
                        continue
                    grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place: [c, vocab]
                    grad[arange, tgt] -= 1.0
                    grad.mul_(weight / tokens)
                    if coef is not None:
                        grad.add_(coef, alpha=weight * plan.distill_weight * temp / tokens)
                    if frozen_coef is not None:  # d(T^2 * KL)/d logits = T * d(KL)/d(logits / T)
                        grad.add_(frozen_coef, alpha=plan.frozen_weights[i] * t_frozen / tokens)
                    grad = grad.to(dt)  # [c, vocab]
                    if grad_feats[i] is not None:
                        grad_feats[i][rows] = (grad @ w_dt).to(grad_feats[i].dtype)  # [c, hidden]
                    slot = plan.head_of[i]
                    if grad_heads[slot] is not None:
                        grad_heads[slot] = _accumulate_matmul(grad_heads[slot], grad.t(), x)  # [vocab, hidden]
        ce = ce_sum / tokens  # [exits]
        kl = kl_sum * (temp * temp) / tokens  # [exits]
        frozen_kl = frozen_sum * (t_frozen * t_frozen) / tokens  # [exits]
        w = torch.tensor(plan.loss_weights, dtype=torch.float32, device=ce.device)
        total = (w * (ce + plan.distill_weight * kl)).sum()
        if frozen:
            total = total + (torch.tensor(plan.frozen_weights, dtype=torch.float32, device=ce.device) * frozen_kl).sum()
        ctx.grads = [*grad_feats, *(g.to(h.dtype) if g is not None else None for g, h in zip(grad_heads, heads)),
                     *(None for _ in frozen)]
        stats = torch.stack([ce, kl, frozen_kl])  # [3, exits]
        ctx.mark_non_differentiable(stats)
        return total, stats

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor, _grad_stats: torch.Tensor):
        grads = [None if g is None else g * grad_total.to(g.dtype) for g in ctx.grads]
        ctx.grads = None  # free them as soon as autograd has taken them
        return (None, None, *grads)


def fused_exit_loss(
    features: Sequence[torch.Tensor],
    heads: Sequence[torch.Tensor],
    targets: torch.Tensor,
    loss_weights: Sequence[float],
    teacher: int | None = None,
    distill_weight: float = 0.0,
    temperature: float = 1.0,
    chunk_rows: int | None = None,
    frozen: FrozenTeacher | None = None,
) -> ExitLosses:
    """Total loss and per-exit CE, self-KD KL and frozen-teacher KL ([exits] each, detached) of
    normed exit features.

    features: one [tokens, hidden] tensor per exit; heads: one [vocab, hidden] weight per exit
    (the same tensor may repeat: it gets one gradient accumulator); targets: [tokens].
    With `teacher` (an exit index) and distill_weight > 0, every other exit adds
    distill_weight * T^2 * KL(softmax(teacher/T) || softmax(exit/T)), the teacher detached.
    With `frozen`, exit i adds frozen.weights[i] * T_f^2 * KL towards the frozen model's distribution.
    """
    unique: list[torch.Tensor] = []
    head_of = []
    for w in heads:
        slot = next((j for j, u in enumerate(unique) if u is w), None)
        if slot is None:
            unique.append(w)
            slot = len(unique) - 1
        head_of.append(slot)
    use_kd = teacher is not None and distill_weight > 0
    plan = LeanPlan(
        head_of=tuple(head_of), loss_weights=tuple(float(w) for w in loss_weights),
        teacher=teacher if use_kd else None, distill_weight=float(distill_weight) if use_kd else 0.0,
        temperature=float(temperature), chunk_rows=chunk_rows or default_chunk_rows(unique[0].shape[0]),
        dtype=_matmul_dtype(features[0], unique[0]),
        frozen_weights=tuple(float(w) for w in frozen.weights) if frozen is not None else None,
        frozen_temperature=float(frozen.temperature) if frozen is not None else 1.0,
        frozen_reverse=bool(frozen.reverse) if frozen is not None else False,
    )
    extra = (frozen.features.detach(), frozen.weight.detach()) if frozen is not None else ()
    total, stats = _FusedExitLoss.apply(plan, targets, *features, *unique, *extra)
    return ExitLosses(total, stats[0], stats[1], stats[2])
