"""CUDA: the frozen-teacher term of the memory-lean loss equals the plain loss under bf16 autocast,
and keeps no [tokens, vocab] tensor (peak memory far below the plain path's). Skipped without CUDA.
Tolerances as in test_lean_loss_gpu.py: losses relative 1e-4, gradients relative 2e-2 / absolute 2e-3."""

from __future__ import annotations

import pytest
import torch

from manyinone.core.space import SubnetSpec
from manyinone.train.lean_loss import LinearHead
from manyinone.train.losses import TeacherTarget, nested_loss

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TOKENS, HIDDEN, TEACHER_HIDDEN, VOCAB = 4096, 256, 384, 32000
SPECS = [SubnetSpec({"depth": d}) for d in (1, 2, 3, 4)]


def _case(reverse: bool, lean: bool):
    g = torch.Generator(device="cuda").manual_seed(0)
    feats = {s: (torch.randn(TOKENS, HIDDEN, device="cuda", generator=g) * 0.5).requires_grad_() for s in SPECS}
    weight = (torch.randn(VOCAB, HIDDEN, device="cuda", generator=g) * 0.05).requires_grad_()
    targets = torch.randint(0, VOCAB, (TOKENS,), device="cuda", generator=g)
    t_feats = torch.randn(TOKENS, TEACHER_HIDDEN, device="cuda", generator=g).bfloat16() * 0.5
    t_weight = (torch.randn(VOCAB, TEACHER_HIDDEN, device="cuda", generator=g) * 0.05).bfloat16()
    frozen = TeacherTarget(t_feats, t_weight, {s: 1.0 for s in SPECS}, temperature=1.5, reverse=reverse)
    norm = torch.nn.Identity()
    head = LinearHead(norm, weight) if lean else (lambda h: torch.nn.functional.linear(h, weight))
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = nested_loss(feats, head, targets, {s: 1.0 for s in SPECS}, teacher=SPECS[-1], distill_weight=0.5,
                          frozen=frozen)
    grads = torch.autograd.grad(out.total, [weight, *feats.values()])
    return out.total.item(), grads, torch.cuda.max_memory_allocated()


@pytest.mark.parametrize("reverse", [False, True])
def test_lean_teacher_term_equals_plain_on_cuda(reverse):
    lean_total, lean_grads, lean_peak = _case(reverse, lean=True)
    plain_total, plain_grads, plain_peak = _case(reverse, lean=False)
    assert lean_total == pytest.approx(plain_total, rel=1e-4)
    for a, b in zip(lean_grads, plain_grads):
        assert torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-3)
    print(f"peak memory: lean {lean_peak / 2**30:.2f} GiB, plain {plain_peak / 2**30:.2f} GiB")
    assert lean_peak < 0.5 * plain_peak, (lean_peak, plain_peak)  # H200: 2.7-2.8 GiB vs 10.9-12.4 GiB
