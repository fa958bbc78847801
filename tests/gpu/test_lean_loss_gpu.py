"""CUDA: the memory-lean loss equals the plain one under bf16 and needs far less memory; the cost benchmark runs.

Skipped on machines without CUDA. Tolerances: losses relative 1e-4 (both round logits to bf16 the
same way, then float32 math); gradients relative 2e-2 / absolute 2e-3 (bf16 matmuls summed in a
different order; the lean path accumulates the head gradient in float32, the plain one in bf16).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from manyinone.train.lean_loss import fused_exit_loss

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TOKENS, HIDDEN, VOCAB, EXITS = 4096, 256, 32000, 5
ROOT = Path(__file__).resolve().parents[2]


def _leaves(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    feats = [(torch.randn(TOKENS, HIDDEN, device="cuda", generator=g) * 0.5).to(dtype).requires_grad_() for _ in range(EXITS)]
    weight = (torch.randn(VOCAB, HIDDEN, device="cuda", generator=g) * 0.05).to(dtype).requires_grad_()
    targets = torch.randint(0, VOCAB, (TOKENS,), device="cuda", generator=g)
    return feats, weight, targets


def _plain(feats, weight, targets, teacher, distill_weight):
    logits = [F.linear(f, weight).float() for f in feats]  # each [tokens, vocab]
    total = 0.0
    for i, z in enumerate(logits):
        term = F.cross_entropy(z, targets)
        if teacher is not None and i != teacher:
            kl = F.kl_div(F.log_softmax(z, -1), F.log_softmax(logits[teacher].detach(), -1), log_target=True,
                          reduction="none").sum(-1).mean()
            term = term + distill_weight * kl
        total = total + term
    return total


def _run(fn, leaves):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    total = fn()
    grads = torch.autograd.grad(total, leaves)
    torch.cuda.synchronize()
    return total.detach(), grads, (torch.cuda.max_memory_allocated() - before) / 2**20


@pytest.mark.parametrize("weights_dtype,autocast", [(torch.bfloat16, False), (torch.float32, True)])
@pytest.mark.parametrize("teacher", [None, EXITS - 1])
def test_lean_equals_plain_on_cuda_and_uses_less_memory(weights_dtype, autocast, teacher):
    feats, weight, targets = _leaves(weights_dtype)
    leaves = [*feats, weight]
    ctx = torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast)
    with ctx:
        lean_total, lean_grads, lean_mib = _run(
            lambda: fused_exit_loss(feats, [weight] * EXITS, targets, [1.0] * EXITS, teacher, 1.0)[0], leaves)
    with ctx:
        plain_total, plain_grads, plain_mib = _run(lambda: _plain(feats, weight, targets, teacher, 1.0), leaves)
    torch.testing.assert_close(lean_total, plain_total, rtol=1e-4, atol=1e-4)
    for got, want in zip(lean_grads, plain_grads):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-3)
    # The plain path holds 5 float32 [tokens, vocab] logits (2.4 GiB here); the lean one a few chunks.
    assert lean_mib < 0.35 * plain_mib, (lean_mib, plain_mib)


def test_train_cost_benchmark_runs_on_cuda(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_cost.py"), "--shape", "tiny", "--batch", "2",
                           "--seq", "128", "--warmup", "1", "--steps", "2", "--variants", "hf-sft,sft,soft,soft-plain,soft-kd",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| soft (lean) |" in proc.stdout and out.is_file()
