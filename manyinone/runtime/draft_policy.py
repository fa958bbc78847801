"""Which exit drafts, and for how long: the draft policy of self-speculative decoding.

A round drafts up to k tokens with the first n layers (each costing c_n of one step at the verifying
depth) and verifies them with the remaining layers in one pass (costing about 1 - c_n at batch 1,
where reading the weights dominates). With per-token acceptance alpha_n, a round emits
E = (1 - alpha^k) / (1 - alpha) tokens for k*c_n + 1 - c_n of cost, so the speed-up over plain
decoding is E / (k*c_n + 1 - c_n) (the verify pass gives a corrected token at the first rejection;
when every drafted token is accepted the last one is carried into the next round).

Fixed policy: one (exit, length), explicit or tuned. Adaptive policy (after DEL, "dynamic exit
layer"): a running, decayed estimate of alpha per exit picks the (exit, length) with the most
expected tokens per unit cost each round. A confidence threshold additionally ends a draft as soon as
the exit's top-1 probability falls below it. None of this changes the output: every drafted token is
verified by the full depth, so greedy output stays the full model's and sampling keeps its distribution.

Pure functions and a small stateful tracker: no model here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from manyinone.core.errors import ManyinoneError

DEFAULT_DRAFT_TOKENS = 4
MAX_DRAFT_TOKENS = 16
PRIOR_ACCEPTANCE = 0.5  # an exit never measured: a coin flip per token
PRIOR_WEIGHT = 8.0  # the prior counts as this many observed tokens
DECAY = 0.97  # per round: the statistics cover about the last 1 / (1 - DECAY) = 33 rounds
EXPLORE = 1.0  # standard errors of optimism (UCB) when ranking exits
GAIN_MARGIN = 0.03  # an adaptive draft must promise this much over plain decoding (rounds have overheads)


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens a round emits with k drafted tokens at per-token acceptance alpha: 1 + alpha + ... + alpha^(k-1)."""
    if alpha >= 1:
        return float(k)
    return (1 - alpha**k) / (1 - alpha)


def round_cost(c: float, k: int) -> float:
    """Cost of a round in full steps: k draft steps of cost c, one verify pass of the other layers (1 - c)."""
    return k * c + (1 - c)


def speedup(alpha: float, c: float, k: int) -> float:
    """Expected tokens per unit cost, relative to plain decoding (1.0 = break-even)."""
    return expected_tokens(alpha, k) / round_cost(c, k)


def best_length(alpha: float, c: float, max_tokens: int) -> tuple[int, float]:
    """(k, speed-up) maximising the expected speed-up over k = 1..max_tokens."""
    return max(((k, speedup(alpha, c, k)) for k in range(1, max_tokens + 1)), key=lambda kv: (kv[1], -kv[0]))


def check_draft(depth: int, draft_depth: int | None = None, draft_tokens: int | None = None,
                threshold: float | None = None) -> None:
    """Refuse settings outside their range with one line naming it (before any work starts)."""
    if draft_depth is not None and not 1 <= draft_depth < depth:
        raise ManyinoneError(f"draft exit {draft_depth} out of range; allowed 1..{depth - 1} "
                             f"(shallower than the serving depth {depth})")
    if draft_tokens is not None and not 1 <= draft_tokens <= MAX_DRAFT_TOKENS:
        raise ManyinoneError(f"draft length {draft_tokens} out of range; allowed 1..{MAX_DRAFT_TOKENS}")
    if threshold is not None and not (isinstance(threshold, (int, float)) and 0 < threshold < 1):
        raise ManyinoneError(f"draft threshold {threshold!r} out of range; allowed 0 < threshold < 1 "
                             "(the exit's top-1 probability below which a draft stops)")


@dataclass
class DraftPlan:
    """A resolved policy for verifying at `depth`: candidate exits with their step cost (relative to one
    step at `depth`) and acceptance prior, the longest draft, the confidence threshold (None: off)."""

    depth: int
    exits: list[int]
    costs: dict[int, float]
    prior: dict[int, float]
    max_tokens: int
    threshold: float | None = None
    adaptive: bool = False


def index_costs(index: dict[str, Any] | None, exits: list[int], depth: int) -> dict[int, float]:
    """Step cost of each exit relative to `depth`, from the budget index's relative costs (its metric);
    layers / depth where the index has no entry (a plain model)."""
    known: dict[int, float] = {}
    if index is not None:
        metric = index.get("metric", "flops")
        for entry in index.get("specs", []):
            spec = entry.get("spec", {})
            if set(spec) == {"depth"}:
                known[int(spec["depth"])] = float(entry["relative"][metric])
    if depth in known:
        return {n: known[n] / known[depth] if n in known else n / depth for n in exits}
    return {n: n / depth for n in exits}


def tuned_policy(index: dict[str, Any] | None, depth: int) -> dict[str, Any]:
    """The checkpoint's stored policy if it was tuned for this verifying depth, else {}."""
    tuned = ((index or {}).get("runtime") or {}).get("speculative") or {}
    return tuned if tuned.get("depth", depth) == depth else {}


def validate(checkpoint: bool, exits: list[int], depth: int, draft_depth: int | None = None,
             draft_tokens: int | None = None, threshold: float | None = None, adaptive: bool | None = None) -> None:
    """Every way a speculation request can be wrong, as one line naming the allowed range, before any work.

    checkpoint: whether the model has a budget index (a plain model has one exit, its full depth);
    exits: its trained exit depths; depth: the serving (verifying) depth."""
    if checkpoint and len(exits) < 2:
        raise ManyinoneError(f"speculation needs a checkpoint with at least two exits; this one has only exit "
                             f"{exits[0]} (train with several exits, or decode without speculation)")
    if depth < 2:
        raise ManyinoneError("speculative decoding needs a serving depth of at least 2 layers; raise the budget "
                             "or decode without speculation")
    check_draft(depth, draft_depth, draft_tokens, threshold)
    if adaptive and draft_depth is not None:
        raise ManyinoneError(f"draft exit {draft_depth} fixes the draft exit; leave it out for an adaptive policy")
    if not checkpoint and draft_depth is None:
        raise ManyinoneError("a plain model has one exit; speculation needs a manyinone checkpoint with at least "
                             "two exits, or an explicit draft exit")


def index_exits(index: dict[str, Any]) -> list[int]:
    """The trained exit depths a budget index lists."""
    return sorted({int(e["spec"]["depth"]) for e in index["specs"] if "depth" in e["spec"]})


def same_kind(tuned: dict[str, Any], runtime) -> bool:
    """Whether a tuned policy was timed on the kind of runtime serving it (fused or not); a policy stored
    before the kind was recorded counts as the same kind."""
    return "fused" not in tuned or bool(tuned["fused"]) == bool(getattr(runtime, "fused", False))


def plan_for(runtime, depth: int, draft_depth: int | None = None, draft_tokens: int | None = None,
             threshold: float | None = None, adaptive: bool | None = None) -> DraftPlan:
    """The draft policy for verifying at `depth`: explicit settings win, then the checkpoint's tuned
    policy, then a fixed default (the trained exit nearest a third of the depth, 4 tokens)."""
    trained = runtime.exits()
    validate(runtime.index is not None, trained, depth, draft_depth, draft_tokens, threshold, adaptive)
    tuned = tuned_policy(runtime.index, depth)
    follow = tuned if draft_depth is None else {}  # an explicit exit is a fixed policy: no tuned threshold/length
    shallower = [e for e in trained if e < depth]
    if not shallower:
        shallower = [max(depth // 3, 1)]
    if adaptive is None:
        adaptive = draft_depth is None and bool(tuned.get("adaptive"))
    if threshold is None and follow.get("threshold") is not None:
        threshold = float(follow["threshold"])
    if draft_tokens is None:
        draft_tokens = int(follow.get("draft_tokens") or DEFAULT_DRAFT_TOKENS)
        draft_tokens = min(max(draft_tokens, 1), MAX_DRAFT_TOKENS)
    stored = {int(e["exit"]): e for e in tuned.get("exits", []) if isinstance(e, dict) and "exit" in e}
    if adaptive:
        exits = [e for e in (stored or shallower) if e < depth] or shallower
    elif draft_depth is not None:
        exits = [draft_depth]
    elif tuned.get("draft_depth") and int(tuned["draft_depth"]) < depth:
        exits = [int(tuned["draft_depth"])]
    else:
        exits = [min(shallower, key=lambda e: (abs(e - depth / 3), e))]
    costs = index_costs(runtime.index, exits, depth)
    # Measured step costs (tune) beat the index's FLOP-based ones, if measured on this kind of runtime: a
    # fused step's cost ratios are not an eager one's (launches dominate small eager steps).
    if same_kind(tuned, runtime):
        for n in exits:
            if n in stored and stored[n].get("cost"):
                costs[n] = float(stored[n]["cost"])
    prior = {n: float(stored[n].get("acceptance", PRIOR_ACCEPTANCE)) if n in stored else PRIOR_ACCEPTANCE
             for n in exits}
    return DraftPlan(depth, sorted(exits), costs, prior, draft_tokens, threshold, bool(adaptive))


@dataclass
class AcceptanceTracker:
    """Running per-exit acceptance (decayed counts plus a prior) and the (exit, length) choice it implies."""

    plan: DraftPlan
    decay: float = DECAY
    prior_weight: float = PRIOR_WEIGHT
    explore: float = EXPLORE
    accepted: dict[int, float] = field(default_factory=dict)
    trials: dict[int, float] = field(default_factory=dict)

    def estimate(self, n: int) -> float:
        """Posterior-mean acceptance of exit n."""
        w = self.prior_weight
        return (self.accepted.get(n, 0.0) + w * self.plan.prior[n]) / (self.trials.get(n, 0.0) + w)

    def choose(self) -> tuple[int, int]:
        """(exit, length) for the next round: the best expected speed-up, exits ranked optimistically
        (UCB) so that one a few bad rounds made look poor is tried again as its counts decay; length 0
        (a plain step) when no draft promises more than GAIN_MARGIN over plain decoding."""
        plan = self.plan
        if not plan.adaptive:
            return plan.exits[0], plan.max_tokens
        best = (1.0 + GAIN_MARGIN, plan.exits[0], 0)  # length 0: a plain step, unless a draft is expected to pay
        for n in plan.exits:
            a = self.estimate(n)
            spread = math.sqrt(max(a * (1 - a), 1e-6) / (self.trials.get(n, 0.0) + self.prior_weight))
            optimistic = min(a + self.explore * spread, 0.999)
            k, score = best_length(optimistic, plan.costs[n], plan.max_tokens)
            if score > best[0]:
                best = (score, n, k)
        return best[1], best[2]

    def observe(self, n: int | None, drafted: list[int], accepted: list[int]) -> None:
        """One round at exit n: per row, `drafted` tokens offered and `accepted` of them kept (a row that
        kept fewer than it was offered saw one rejection). n None: a plain step (the counts only decay, so
        the optimism that tries drafting again grows back)."""
        for name in list(self.trials):
            self.trials[name] *= self.decay
            self.accepted[name] *= self.decay
        if n is None:
            return
        kept = sum(accepted)
        rejections = sum(1 for d, m in zip(drafted, accepted) if m < d)
        self.accepted[n] = self.accepted.get(n, 0.0) + kept
        self.trials[n] = self.trials.get(n, 0.0) + kept + rejections
