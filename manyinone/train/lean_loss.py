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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

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
class LeanPlan:
    """What the fused Function computes; plain data so forward/backward stay readable."""

    head_of: tuple[int, ...]  # exit i uses unique head weight head_of[i]
    loss_weights: tuple[float, ...]  # w_i per exit
    teacher: int | None  # exit index whose logits are the distillation target; None = no distillation
    distill_weight: float
    temperature: float
    chunk_rows: int
    dtype: torch.dtype  # matmul dtype (the autocast dtype, else the promoted input dtype)


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
    distinct head weights [vocab, hidden]. Outputs: the total (float32 scalar) and a detached
    [2, exits] tensor of per-exit CE and KL for logging.
    """

    @staticmethod
    def forward(ctx, plan: LeanPlan, targets: torch.Tensor, *tensors: torch.Tensor):
        n_exits = len(plan.head_of)
        feats, heads = tensors[:n_exits], tensors[n_exits:]
        need = ctx.needs_input_grad[2:]
        want_grad = any(need)
        tokens = targets.numel()
        dt, temp = plan.dtype, plan.temperature
        heads_dt = [w.to(dt) for w in heads]  # one cast per call, not per chunk
        grad_feats = [torch.empty_like(f) if need[i] else None for i, f in enumerate(feats)]
        grad_heads = [torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need[n_exits + j] else None
                      for j, w in enumerate(heads)]
        ce_sum = torch.zeros(n_exits, dtype=torch.float32, device=targets.device)
        kl_sum = torch.zeros(n_exits, dtype=torch.float32, device=targets.device)
        # The teacher goes first: its distribution must be read before its logits are reused in place.
        order = sorted(range(n_exits), key=lambda i: i != plan.teacher)
        with torch.autocast(targets.device.type, enabled=False):
            for start in range(0, tokens, plan.chunk_rows):
                rows = slice(start, start + plan.chunk_rows)
                tgt = targets[rows]  # [c]
                arange = torch.arange(tgt.numel(), device=tgt.device)
                teacher_p = teacher_logp = None
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
                    grad = grad.to(dt)  # [c, vocab]
                    if grad_feats[i] is not None:
                        grad_feats[i][rows] = (grad @ w_dt).to(grad_feats[i].dtype)  # [c, hidden]
                    slot = plan.head_of[i]
                    if grad_heads[slot] is not None:
                        grad_heads[slot] = _accumulate_matmul(grad_heads[slot], grad.t(), x)  # [vocab, hidden]
        ce = ce_sum / tokens  # [exits]
        kl = kl_sum * (temp * temp) / tokens  # [exits]
        w = torch.tensor(plan.loss_weights, dtype=torch.float32, device=ce.device)
        total = (w * (ce + plan.distill_weight * kl)).sum()
        ctx.grads = [*grad_feats, *(g.to(h.dtype) if g is not None else None for g, h in zip(grad_heads, heads))]
        stats = torch.stack([ce, kl])  # [2, exits]
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Total loss, per-exit CE [exits] and per-exit KL [exits] (detached) of normed exit features.

    features: one [tokens, hidden] tensor per exit; heads: one [vocab, hidden] weight per exit
    (the same tensor may repeat: it gets one gradient accumulator); targets: [tokens].
    With `teacher` (an exit index) and distill_weight > 0, every other exit adds
    distill_weight * T^2 * KL(softmax(teacher/T) || softmax(exit/T)), the teacher detached.
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
    )
    total, stats = _FusedExitLoss.apply(plan, targets, *features, *unique)
    return total, stats[0], stats[1]
