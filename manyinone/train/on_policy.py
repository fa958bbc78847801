"""On-policy rows (GKD-style): part of each micro-batch answers its prompts with the model's own sample.

Speculative acceptance is measured on what the full depth generates, so the exits should be
taught on those continuations, scored against the frozen teacher (Agarwal et al., 2024, GKD).
The first `round(ratio * batch)` rows of a micro-batch (the epoch order is already shuffled) keep
their prompt and get a continuation the current model samples at full depth; the rest keep their
labels. The sampling seed derives from (seed, step, micro), so a resumed run rebuilds the same
batches. At temperature 1 the full depth's cross-entropy on its own samples has zero expected
gradient (E_{y~p}[grad log p(y)] = 0), so the labels there only teach the exits; the teacher's KL
is what moves the full depth.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from manyinone.train.data import IGNORE, Example

# (prompts as token ids, seed) -> one continuation per prompt (token ids, the stop token excluded)
Sampler = Callable[[list[list[int]], int], list[list[int]]]


def on_policy_seed(seed: int, step: int, micro: int) -> int:
    return ((seed * 1_000_003 + step) * 1_009 + micro + 7_919) % 2**63


def prompt_of(example: Example) -> list[int]:
    """The prompt tokens: everything before the first supervised label."""
    first = next(i for i, label in enumerate(example.labels) if label != IGNORE)
    return example.input_ids[:first]


def rows_on_policy(batch: int, ratio: float) -> int:
    """How many rows of a micro-batch of `batch` are sampled: at least one whenever ratio > 0."""
    return 0 if ratio <= 0 else min(batch, max(1, round(ratio * batch)))


def on_policy_batch(examples: Sequence[Example], sample: Sampler, ratio: float, seed: int, step: int, micro: int,
                    max_length: int, stop_id: int | None) -> list[Example]:
    """`examples` with the first rows' responses replaced by sampled continuations (then `stop_id`,
    when the sample stopped before its length limit)."""
    k = rows_on_policy(len(examples), ratio)
    if k == 0:
        return list(examples)
    prompts = [prompt_of(e) for e in examples[:k]]
    asked = [p for p in prompts if p]  # a raw-text row (supervised throughout) has no prompt to answer
    replies = iter(sample(asked, on_policy_seed(seed, step, micro)) if asked else [])
    fresh = []
    for prompt, original in zip(prompts, examples):
        if not prompt:
            fresh.append(original)
            continue
        reply = list(next(replies)) + ([stop_id] if stop_id is not None else [])
        ids, labels = (prompt + reply)[:max_length], ([IGNORE] * len(prompt) + reply)[:max_length]
        # A prompt that fills max_length leaves no sampled token to learn from: keep the labelled row.
        fresh.append(Example(ids, labels) if any(label != IGNORE for label in labels[1:]) else original)
    return fresh + list(examples[k:])


def runtime_sampler(model, tokenizer, max_new_tokens: int, temperature: float, max_len: int) -> Sampler:
    """Continuations from the model being trained, through manyinone's runtime (eval mode inside the
    call, train mode restored). The runtime reads the model's parameters in place, so every call
    samples from the current weights."""
    from manyinone.runtime.generate import Runtime
    from manyinone.runtime.sampling import Sampling

    runtime = Runtime(model, tokenizer, max_len=max_len + max_new_tokens)
    model.train()  # Runtime() puts the model in eval mode

    def sample(prompts: list[list[int]], seed: int) -> list[list[int]]:
        was_training = model.training
        model.eval()
        try:
            # Sized to the largest batch asked so far: a smaller last batch evicts rather than adds a cache
            # (an unbounded limit kept one cache per batch size beside the training step's memory).
            runtime.fit_batch(len(prompts))
            return runtime.generate(prompts, None, max_new_tokens, Sampling(temperature, 1.0, seed)).tokens
        finally:
            model.train(was_training)

    sample.runtime = runtime  # the caches it keeps, for a caller (or test) to inspect
    return sample
