"""Speculative sampling keeps the full model's distribution: a chi-square test of the joint distribution of
whole generated sequences, for draft lengths k = 1..4, against the exact target computed by enumeration.

A tiny model with a 4-token vocabulary and large random weights (peaked distributions, a shallow exit that
disagrees with the full depth) generates k + 1 tokens from one prompt in thousands of independent rows over
several seeds; every one of the 4^(k+1) sequences has an exact probability under the full model, so the
observed counts either fit it or they do not. The same harness with a planted bug (every draft accepted)
must be rejected, which shows that the test has power.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import manyinone.runtime.speculative as speculative
from manyinone.runtime import Runtime, Sampling
from manyinone.runtime.sampling import probabilities

VOCAB = 4
PROMPT = [1, 3, 0, 2]
ROWS, SEEDS = 2000, 3  # 6000 independent sequences per k


@pytest.fixture(scope="module")
def peaked_model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.4, pad_token_id=0, bos_token_id=1, eos_token_id=None)
    return LlamaForCausalLM(config).eval()


def exact_sequence_probs(model, prompt: list[int], length: int, sampling: Sampling) -> torch.Tensor:
    """P(sequence) [VOCAB ** length] of every continuation of `length` tokens under the full model."""
    seqs = torch.tensor(list(itertools.product(range(VOCAB), repeat=length)))  # [VOCAB**length, length]
    ids = torch.cat([torch.tensor(prompt).expand(len(seqs), -1), seqs], 1)  # [VOCAB**length, prompt + length]
    with torch.no_grad():
        logits = model(ids).logits[:, len(prompt) - 1: -1].double()  # [VOCAB**length, length, vocab]
    probs = probabilities(logits, sampling).double()  # [VOCAB**length, length, vocab]
    return probs.gather(-1, seqs[..., None])[..., 0].prod(-1)  # [VOCAB**length]


def chi_square_p(observed: torch.Tensor, expected_probs: torch.Tensor) -> tuple[float, int]:
    """(p-value, degrees of freedom) of Pearson's chi-square; bins expected below 5 are pooled into one."""
    total = observed.sum()
    expected = expected_probs * total
    small = expected < 5
    obs = torch.cat([observed[~small], observed[small].sum()[None]]) if small.any() else observed
    exp = torch.cat([expected[~small], expected[small].sum()[None]]) if small.any() else expected
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    df = int(keep.sum()) - 1
    # The chi-square survival function is the regularised upper incomplete gamma Q(df/2, x/2).
    return float(torch.special.gammaincc(torch.tensor(df / 2.0), stat / 2.0)), df


def sampled_counts(rt: Runtime, k: int, sampling: Sampling) -> tuple[torch.Tensor, dict]:
    length = k + 1  # the first token comes from the prompt's forward, then a round of k drafted tokens
    counts = torch.zeros(VOCAB**length, dtype=torch.float64)
    stats: dict = {}
    for seed in range(SEEDS):
        out = rt.generate([PROMPT] * ROWS, max_new_tokens=length, sampling=Sampling(sampling.temperature,
                          sampling.top_p, seed=seed), stop_ids=set(), speculative=True, draft_depth=3, draft_tokens=k)
        codes = torch.tensor(out.tokens) @ (VOCAB ** torch.arange(length - 1, -1, -1))  # [ROWS]
        counts += torch.bincount(codes, minlength=VOCAB**length).double()
        for key in ("drafted", "accepted"):
            stats[key] = stats.get(key, 0) + out.stats[key]
    return counts, stats


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_speculative_sampling_matches_the_target_distribution(peaked_model, k):
    rt = Runtime(peaked_model, max_len=16)
    sampling = Sampling(1.0, 1.0)
    counts, stats = sampled_counts(rt, k, sampling)
    # The draft must disagree often, or the test would not exercise rejection and replacement.
    assert 0.2 < stats["accepted"] / stats["drafted"] < 0.9
    p, df = chi_square_p(counts, exact_sequence_probs(peaked_model, PROMPT, k + 1, sampling))
    assert p > 1e-3, f"k={k}: chi-square p={p:.2e} over {df} degrees of freedom"


def test_temperature_and_top_p_are_kept(peaked_model):
    rt = Runtime(peaked_model, max_len=16)
    sampling = Sampling(0.7, 0.9)
    counts, _ = sampled_counts(rt, 2, sampling)
    p, df = chi_square_p(counts, exact_sequence_probs(peaked_model, PROMPT, 3, sampling))
    assert p > 1e-3, f"chi-square p={p:.2e} over {df} degrees of freedom"


def test_the_chi_square_test_catches_a_lossy_acceptance_rule(peaked_model, monkeypatch):
    """Plant the bug the test guards against (keep every drafted token): the fit must be rejected."""

    def accept_all(draft, draft_probs, target_probs, generator):
        rows, k = draft.shape
        return torch.full((rows,), k, dtype=torch.long), draft[:, -1]

    monkeypatch.setattr(speculative, "accept_sampled_rows", accept_all)
    rt = Runtime(peaked_model, max_len=16)
    sampling = Sampling(1.0, 1.0)
    counts, _ = sampled_counts(rt, 2, sampling)
    p, _ = chi_square_p(counts, exact_sequence_probs(peaked_model, PROMPT, 3, sampling))
    assert p < 1e-6
