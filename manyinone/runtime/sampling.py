"""Token choice: greedy, temperature / top-p sampling, and the acceptance rule of speculative decoding.

Pure tensor functions, no model: the draft/verify loop calls them on logits it already has.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from manyinone.core.errors import ManyinoneError


@dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy; otherwise sample from softmax(logits / temperature) cut to top-p mass."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and self.temperature <= 100):
            raise ManyinoneError(f"temperature {self.temperature!r} out of range; allowed 0 <= temperature <= 100")
        if not (0 < self.top_p <= 1):
            raise ManyinoneError(f"top_p {self.top_p!r} out of range; allowed 0 < top_p <= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# Top-p looks among the most probable tokens first, on a distribution this large or larger (rows x
# vocab): a sort of the whole vocabulary per row was 18% of distill-data's GPU time at batch 1,024
# (benchmarks/RESULTS.md, the sampler profile). Smaller ones keep the plain sort: the candidate check
# reads the device once, and at a few rows that wait would cost the decode loop its lead over the GPU.
TOP_P_CANDIDATES = 1024
TOP_P_CANDIDATES_FROM = 1 << 22


def probabilities(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Sampling distribution [..., vocab] (float32) after temperature and top-p (nucleus) truncation."""
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)  # [..., vocab]
    if sampling.top_p >= 1:
        return probs
    probs = probs * nucleus(probs, sampling.top_p)
    return probs / probs.sum(-1, keepdim=True)


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The tokens top-p keeps [..., vocab] (bool): in descending order of probability, a token is kept if
    the mass of the tokens before it is < top_p (so the top token always stays).

    On large inputs the rule runs on the TOP_P_CANDIDATES most probable tokens of each row (a top-k, far
    cheaper than sorting the vocabulary) whenever those hold top_p of every row's mass: then no token
    outside them can be kept, and the result is the full sort's. Otherwise the whole vocabulary is sorted."""
    vocab = probs.shape[-1]
    if probs.numel() >= TOP_P_CANDIDATES_FROM and vocab > TOP_P_CANDIDATES:
        top, order = probs.topk(TOP_P_CANDIDATES, dim=-1)  # [..., candidates], descending
        mass = top.cumsum(-1)
        if bool((mass[..., -1] >= top_p).all()):  # the one host read
            return torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, (mass - top) < top_p)
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # [..., vocab]
    keep_sorted = (sorted_probs.cumsum(-1) - sorted_probs) < top_p
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def choose(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids [...] from logits [..., vocab]: argmax when greedy, else a sample."""
    if sampling.greedy:
        return logits.argmax(-1)
    probs = probabilities(logits, sampling)
    flat = probs.reshape(-1, probs.shape[-1])  # [rows, vocab]
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


def step_output(chosen: list[int], live: list[bool], stop: set[int]) -> list[list[int]]:
    """What one decode step yields per row: [token] while the row is live, [] once it has stopped;
    a row stops at its first token in `stop` (that token is not yielded). Updates `live` in place."""
    out = []
    for row, t in enumerate(chosen):
        if live[row] and t in stop:
            live[row] = False
        out.append([t] if live[row] else [])
    return out


def accept_greedy(draft: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Number of leading draft tokens [k] equal to the full model's greedy tokens [k] (a 0-dim tensor)."""
    return (draft == target).long().cumprod(0).sum()


def accept_sampled(draft: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor,
                   generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`accept_sampled_rows` for one row: draft [k], draft_probs / target_probs [k, vocab]; 0-dim results."""
    accepted, replacement = accept_sampled_rows(draft[None], draft_probs[None], target_probs[None], generator)
    return accepted[0], replacement[0]


def accept_sampled_rows(draft: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor,
                        generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling (Leviathan et al. 2023) for every row at once: lossless w.r.t. the target.

    draft [rows, k] tokens sampled from draft_probs [rows, k, vocab]; target_probs [rows, k, vocab] the
    full model's distributions at the same positions. Token i is kept with probability
    min(1, p_i(d_i) / q_i(d_i)); at the first rejection j a replacement is drawn from
    normalise(max(p_j - q_j, 0)). Returns (accepted count m [rows], replacement token for position m
    [rows]; meaningless where m == k).
    """
    rows, k = draft.shape
    p = target_probs.gather(-1, draft[..., None])[..., 0]  # [rows, k]
    q = draft_probs.gather(-1, draft[..., None])[..., 0]  # [rows, k]
    u = torch.rand(rows, k, device=draft.device, generator=generator)  # [rows, k]
    accepted = (u * q <= p).long().cumprod(1).sum(1)  # [rows]
    j = accepted.clamp(max=k - 1)[:, None, None].expand(rows, 1, target_probs.shape[-1])  # [rows, 1, vocab]
    target_j = target_probs.gather(1, j)[:, 0]  # [rows, vocab]
    residual = (target_j - draft_probs.gather(1, j)[:, 0]).clamp(min=0)  # [rows, vocab]
    # p == q exactly leaves no residual mass; then p itself is the right distribution.
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, target_j)
    replacement = torch.multinomial(residual / residual.sum(-1, keepdim=True), 1, generator=generator)[:, 0]  # [rows]
    return accepted, replacement
