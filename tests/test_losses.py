"""The nested-loss engine on tiny hand-computed logits."""

from __future__ import annotations

import math

import pytest
import torch

from manyinone.core.space import SubnetSpec
from manyinone.core.errors import ManyinoneError
from manyinone.train.losses import distill_kl, exit_weights, nested_loss, supervised_positions, token_cross_entropy

S1, S2, S4 = SubnetSpec(depth=1), SubnetSpec(depth=2), SubnetSpec(depth=4)
LN3 = math.log(3.0)


# --- exit weights -----------------------------------------------------------------------------
def test_exit_weights_default_all_one():
    assert exit_weights([S1, S2, S4], None) == {S1: 1.0, S2: 1.0, S4: 1.0}


def test_exit_weights_explicit():
    weights = exit_weights([S1, S2, S4], [0, 0.5, 2])
    assert weights == {S1: 0.0, S2: 0.5, S4: 2.0}
    assert all(isinstance(w, float) for w in weights.values())


@pytest.mark.parametrize("weights", [[1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [1.0, -0.1, 1.0]])
def test_exit_weights_invalid(weights):
    with pytest.raises(ManyinoneError) as err:
        exit_weights([S1, S2, S4], weights)
    assert "need 3 non-negative numbers" in str(err.value) and "depth=2" in str(err.value)


# --- cross-entropy and KL ---------------------------------------------------------------------
@pytest.mark.parametrize("vocab", [2, 7, 100])
def test_cross_entropy_of_uniform_logits_is_log_vocab(vocab):
    logits = torch.zeros(5, vocab)
    targets = torch.arange(5) % vocab
    assert token_cross_entropy(logits, targets).item() == pytest.approx(math.log(vocab), abs=1e-6)


def test_cross_entropy_two_classes_by_hand():
    # logits (0, ln 3): p = (1/4, 3/4).
    logits = torch.tensor([[0.0, LN3], [0.0, LN3]])
    assert token_cross_entropy(logits[:1], torch.tensor([1])).item() == pytest.approx(-math.log(0.75), abs=1e-6)
    assert token_cross_entropy(logits[:1], torch.tensor([0])).item() == pytest.approx(-math.log(0.25), abs=1e-6)
    # The mean over tokens.
    mean = token_cross_entropy(logits, torch.tensor([1, 0])).item()
    assert mean == pytest.approx((-math.log(0.75) - math.log(0.25)) / 2, abs=1e-6)


def test_cross_entropy_is_float32_for_half_logits():
    logits = torch.tensor([[0.0, LN3]], dtype=torch.bfloat16)
    out = token_cross_entropy(logits, torch.tensor([1]))
    assert out.dtype == torch.float32


def test_kl_of_identical_logits_is_zero():
    logits = torch.randn(4, 11, generator=torch.Generator().manual_seed(0))
    assert distill_kl(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert distill_kl(logits, logits.clone(), temperature=3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_two_classes_is_teacher_to_student():
    student = torch.tensor([[0.0, LN3]])  # q = (1/4, 3/4)
    teacher = torch.tensor([[0.0, 0.0]])  # p = (1/2, 1/2)
    kl_p_q = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # = 0.5 ln(4/3) = 0.1438
    kl_q_p = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # = 0.1308, the other direction
    got = distill_kl(student, teacher).item()
    assert got == pytest.approx(kl_p_q, abs=1e-6)
    assert got != pytest.approx(kl_q_p, abs=1e-3)


def test_kl_temperature_softens_and_scales_by_t_squared():
    student, teacher, t = torch.tensor([[0.0, LN3]]), torch.tensor([[0.0, 0.0]]), 2.0
    q1 = math.sqrt(3) / (1 + math.sqrt(3))  # softmax((0, ln3 / 2))
    q = (1 - q1, q1)
    expected = (0.5 * math.log(0.5 / q[0]) + 0.5 * math.log(0.5 / q[1])) * t * t
    assert distill_kl(student, teacher, temperature=t).item() == pytest.approx(expected, abs=1e-6)


def test_kl_mean_over_tokens():
    student = torch.tensor([[0.0, LN3], [0.0, 0.0]])
    teacher = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    assert distill_kl(student, teacher).item() == pytest.approx(0.5 * math.log(4 / 3) / 2, abs=1e-6)


def test_kl_gradient_reaches_student_only():
    student = torch.tensor([[0.0, LN3]], requires_grad=True)
    teacher = torch.tensor([[0.0, 0.0]], requires_grad=True)
    distill_kl(student, teacher).backward()
    assert teacher.grad is None
    # d KL / d student logits = q - p = (1/4 - 1/2, 3/4 - 1/2).
    assert torch.allclose(student.grad, torch.tensor([[-0.25, 0.25]]), atol=1e-6)


# --- nested_loss ------------------------------------------------------------------------------
class CountingHead(torch.nn.Module):
    def __init__(self, hidden=3, vocab=5):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(hidden, vocab)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.proj(x)


@pytest.fixture
def features():
    g = torch.Generator().manual_seed(1)
    return {s: torch.randn(6, 3, generator=g) for s in (S1, S2, S4)}  # [tokens, hidden]


TARGETS = torch.tensor([0, 1, 2, 3, 4, 0])


def test_nested_loss_plain_sum_of_weighted_ce(features):
    head = CountingHead()
    weights = {S1: 0.5, S2: 1.0, S4: 2.0}
    out = nested_loss(features, head, TARGETS, weights)
    ce = {s: token_cross_entropy(head(f), TARGETS) for s, f in features.items()}
    expected = sum(weights[s] * ce[s] for s in features)
    assert out.total.item() == pytest.approx(expected.item(), abs=1e-6)
    assert set(out.ce) == {S1, S2, S4} and out.kl == {}
    assert all(out.ce[s].item() == pytest.approx(ce[s].item(), abs=1e-6) for s in ce)
    assert not any(v.requires_grad for v in out.ce.values())  # logged values are detached


def test_nested_loss_with_distillation(features):
    head = CountingHead()
    weights = {S1: 0.5, S2: 1.0, S4: 2.0}
    w_kd, temp = 0.3, 2.0
    out = nested_loss(features, head, TARGETS, weights, teacher=S4, distill_weight=w_kd, temperature=temp)
    assert head.calls == 3  # the teacher's logits are computed once, for its CE and as the target
    logits = {s: head(f) for s, f in features.items()}
    ce = {s: token_cross_entropy(logits[s], TARGETS) for s in features}
    kl = {s: distill_kl(logits[s], logits[S4], temp) for s in (S1, S2)}
    expected = weights[S4] * ce[S4] + sum(weights[s] * (ce[s] + w_kd * kl[s]) for s in (S1, S2))
    assert out.total.item() == pytest.approx(expected.item(), abs=1e-6)
    assert set(out.kl) == {S1, S2}  # the teacher gets no KL term
    assert out.kl[S1].item() == pytest.approx(kl[S1].item(), abs=1e-6)
    assert out.kl[S1].item() > 0


def test_nested_loss_skips_distillation_when_teacher_not_sampled(features):
    head = CountingHead()
    subset = {S1: features[S1], S2: features[S2]}
    out = nested_loss(subset, head, TARGETS, {S1: 1.0, S2: 1.0}, teacher=S4, distill_weight=1.0)
    plain = nested_loss(subset, head, TARGETS, {S1: 1.0, S2: 1.0})
    assert out.kl == {}
    assert out.total.item() == pytest.approx(plain.total.item(), abs=1e-6)


def test_nested_loss_missing_weight_defaults_to_one(features):
    head = CountingHead()
    out = nested_loss(features, head, TARGETS, {S1: 0.0})
    ce = {s: token_cross_entropy(head(f), TARGETS) for s, f in features.items()}
    assert out.total.item() == pytest.approx((ce[S2] + ce[S4]).item(), abs=1e-6)


def test_nested_loss_zero_weight_exit_gets_no_gradient(features):
    feats = {s: f.clone().requires_grad_() for s, f in features.items()}
    out = nested_loss(feats, CountingHead(), TARGETS, {S1: 0.0, S2: 1.0, S4: 1.0})
    out.total.backward()
    assert torch.count_nonzero(feats[S1].grad) == 0
    assert torch.count_nonzero(feats[S2].grad) > 0


# --- supervised positions ---------------------------------------------------------------------
def test_supervised_positions_shift_by_one():
    hidden = torch.arange(4.0).view(1, 4, 1)  # hidden[0, t] = t
    labels = torch.tensor([[-100, -100, 7, 8]])
    feats, targets = supervised_positions(hidden, labels)
    # Position t predicts labels[t + 1]: positions 1 and 2 predict 7 and 8.
    assert feats.squeeze(-1).tolist() == [1.0, 2.0]
    assert targets.tolist() == [7, 8]


def test_supervised_positions_batch_with_padding():
    hidden = torch.arange(10.0).view(2, 5, 1)  # row 0: 0..4, row 1: 5..9
    labels = torch.tensor([[-100, 11, 12, -100, -100],  # right padding after two response tokens
                           [-100, -100, -100, 21, 22]])
    feats, targets = supervised_positions(hidden, labels)
    assert feats.shape == (4, 1)
    assert feats.squeeze(-1).tolist() == [0.0, 1.0, 7.0, 8.0]
    assert targets.tolist() == [11, 12, 21, 22]


def test_supervised_positions_first_label_is_never_a_target():
    hidden = torch.zeros(1, 3, 2)
    labels = torch.tensor([[5, -100, -100]])
    feats, targets = supervised_positions(hidden, labels)
    assert feats.shape == (0, 2) and targets.numel() == 0
