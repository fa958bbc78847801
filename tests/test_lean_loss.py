"""The memory-lean nested loss equals the plain one: loss, per-exit CE/KL and every gradient.

Tolerance: float32 on CPU, relative 1e-5 (abs 1e-6) for losses and gradients — the two paths do
the same float32 math in a different order (chunked sums). Under bf16 autocast both round the
logits to bf16 the same way; there the tolerance is bf16's (relative 2e-2 on gradients).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from helpers import sample_batch
from manyinone.core.space import SubnetSpec
from manyinone.train.lean_loss import LinearHead, fused_exit_loss
from manyinone.train.losses import nested_loss, supervised_positions
from manyinone.core.registry import adapter_for

TOKENS, HIDDEN, VOCAB = 23, 8, 31
SPECS = [SubnetSpec(depth=d) for d in (1, 2, 4)]


def _leaves(seed: int, exits: int = 3, heads: int = 1):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(TOKENS, HIDDEN, generator=g).requires_grad_() for _ in range(exits)]
    weights = [torch.randn(VOCAB, HIDDEN, generator=g).requires_grad_() for _ in range(heads)]
    targets = torch.randint(0, VOCAB, (TOKENS,), generator=g)
    return feats, weights, targets


def _plain(feats, heads, targets, loss_weights, teacher, distill_weight, temperature):
    """The reference written out with full logits, as losses.nested_loss's plain path does."""
    logits = [F.linear(f, w).float() for f, w in zip(feats, heads)]  # each [tokens, vocab]
    ces = [F.cross_entropy(z, targets) for z in logits]
    kls = []
    total = 0.0
    for i, (z, ce) in enumerate(zip(logits, ces)):
        term = ce
        if teacher is not None and i != teacher:
            t = temperature
            kl = F.kl_div(F.log_softmax(z / t, -1), F.log_softmax(logits[teacher].detach() / t, -1),
                          log_target=True, reduction="none").sum(-1).mean() * t * t
            kls.append(kl)
            term = term + distill_weight * kl
        total = total + loss_weights[i] * term
    return total, ces, kls


def _grads(total, leaves):
    return torch.autograd.grad(total, leaves)


def _close(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("chunk_rows", [1, 5, 64])
@pytest.mark.parametrize("teacher,distill_weight,temperature", [(None, 0.0, 1.0), (2, 0.7, 1.0), (2, 1.5, 2.0)])
def test_fused_loss_equals_plain_loss_and_gradients(chunk_rows, teacher, distill_weight, temperature):
    feats, (w,), targets = _leaves(0)
    loss_weights = [0.5, 1.0, 2.0]
    total, ce, kl, _ = fused_exit_loss(feats, [w] * 3, targets, loss_weights, teacher, distill_weight, temperature,
                                    chunk_rows=chunk_rows)
    ref_total, ref_ce, ref_kl = _plain(feats, [w] * 3, targets, loss_weights, teacher, distill_weight, temperature)
    _close(total, ref_total)
    _close(ce, torch.stack(ref_ce).detach())
    if teacher is not None:
        _close(kl[:2], torch.stack(ref_kl).detach())
    assert kl[-1] == 0
    for got, want in zip(_grads(total, [*feats, w]), _grads(ref_total, [*feats, w])):
        _close(got, want)


def test_fused_loss_with_distinct_heads_per_exit():
    feats, heads, targets = _leaves(1, exits=3, heads=2)
    per_exit = [heads[0], heads[1], heads[0]]
    total, _, _, _ = fused_exit_loss(feats, per_exit, targets, [1, 1, 1], teacher=2, distill_weight=1.0, chunk_rows=4)
    ref, _, _ = _plain(feats, per_exit, targets, [1, 1, 1], 2, 1.0, 1.0)
    _close(total, ref)
    for got, want in zip(_grads(total, [*feats, *heads]), _grads(ref, [*feats, *heads])):
        _close(got, want)


def test_fused_loss_scales_with_the_incoming_gradient():
    feats, (w,), targets = _leaves(2)
    total, _, _, _ = fused_exit_loss(feats, [w] * 3, targets, [1, 1, 1], chunk_rows=7)
    ref, _, _ = _plain(feats, [w] * 3, targets, [1, 1, 1], None, 0.0, 1.0)
    for got, want in zip(_grads(total * -3.5, [*feats, w]), _grads(ref * -3.5, [*feats, w])):
        _close(got, want)


def test_fused_loss_keeps_no_tokens_by_vocab_tensor_for_backward():
    feats, (w,), targets = _leaves(3)
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fused_exit_loss(feats, [w] * 3, targets, [1, 1, 1], teacher=2, distill_weight=1.0, chunk_rows=4)
    assert max(saved, default=0) < TOKENS * VOCAB
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _plain(feats, [w] * 3, targets, [1, 1, 1], 2, 1.0, 1.0)
    assert max(saved) >= TOKENS * VOCAB  # the check can see a [tokens, vocab] tensor when there is one


def test_fused_loss_without_grad_gives_the_loss():
    feats, (w,), targets = _leaves(4)
    with torch.no_grad():
        total, ce, _, _ = fused_exit_loss(feats, [w] * 3, targets, [1, 1, 1], chunk_rows=6)
    ref, ref_ce, _ = _plain(feats, [w] * 3, targets, [1, 1, 1], None, 0.0, 1.0)
    _close(total, ref.detach())
    _close(ce, torch.stack(ref_ce).detach())


def test_fused_loss_under_bf16_autocast_matches_plain_within_bf16():
    feats, (w,), targets = _leaves(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, _, _, _ = fused_exit_loss(feats, [w] * 3, targets, [1, 1, 1], teacher=2, distill_weight=1.0, chunk_rows=5)
        ref, _, _ = _plain(feats, [w] * 3, targets, [1, 1, 1], 2, 1.0, 1.0)
    # Both round logits to bf16 identically, then do float32 math: the losses agree to float32 noise.
    _close(total, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(_grads(total, [*feats, w]), _grads(ref, [*feats, w])):
        assert got.dtype == want.dtype == torch.float32
        _close(got, want, rtol=2e-2, atol=2e-3)


# --- through the model: nested_loss with a LinearHead vs the adapter's exit_logits ------------------
@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_llama_tied"])
@pytest.mark.parametrize("distill_weight", [0.0, 1.0])
def test_nested_loss_lean_equals_plain_on_a_model(request, fixture, distill_weight):
    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(fixture), dtype=torch.float32)
    adapter = adapter_for(model)
    ids, mask = sample_batch()
    labels = ids.masked_fill(mask == 0, -100)
    results = []
    for lean in (False, True):
        model.zero_grad(set_to_none=True)
        hidden = adapter.forward_nested(ids, mask, SPECS)
        feats = {}
        for spec, h in hidden.items():
            feats[spec], targets = supervised_positions(h, labels)
        head = adapter.linear_head() if lean else adapter.exit_logits
        assert isinstance(head, LinearHead) or not lean
        out = nested_loss(feats, head, targets, {SPECS[0]: 0.5}, teacher=SPECS[-1], distill_weight=distill_weight,
                          temperature=2.0, chunk_rows=7)
        out.total.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (plain, plain_grads), (lean, lean_grads) = results
    _close(lean.total, plain.total)
    assert set(lean.ce) == set(plain.ce) and set(lean.kl) == set(plain.kl)
    for spec in plain.ce:
        _close(lean.ce[spec], plain.ce[spec])
    for spec in plain.kl:
        _close(lean.kl[spec], plain.kl[spec])
    assert set(lean_grads) == set(plain_grads)
    for name in plain_grads:
        _close(lean_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6)
