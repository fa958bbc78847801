"""Per-exit quality on held-out data: loss, perplexity, agreement and KL against the full model."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from manyinone.core.adapter import ModelAdapter
from manyinone.io.durable import atomic_dir
from manyinone.train.data import IGNORE, Example, collate
from manyinone.core.space import NestedSpace, SubnetSpec
from manyinone.train.losses import supervised_positions
from manyinone.train.progress import TrainProgress

LogitsFn = Callable[[SubnetSpec, torch.Tensor], torch.Tensor]


@torch.no_grad()
def evaluate_exits(adapter: ModelAdapter, space: NestedSpace, examples: list[Example], pad_id: int,
                   batch_size: int = 8, device: str | torch.device = "cpu", costs: dict[str, float] | None = None,
                   show_progress: bool = False, logits_for: LogitsFn | None = None,
                   forward: Callable[..., dict[SubnetSpec, torch.Tensor]] | None = None) -> list[dict[str, Any]]:
    """One row per spec: mean response-token loss, perplexity, top-1 accuracy (argmax == target), top-2
    and top-4 accuracy (the target among the spec's 2 / 4 most probable tokens), top-1 agreement and
    KL(full || spec).

    logits_for(spec, hidden) gives an exit's logits (default: the adapter's shared norm and head;
    pass `NestedModel.exit_logits` for checkpoints with per-exit modules); forward(ids, mask, specs) the
    hidden states (default the adapter's `forward_nested`; pass `NestedModel.forward_nested` with them).
    """
    specs, full = space.specs(), space.full()
    logits_for = logits_for or (lambda _spec, h: adapter.exit_logits(h))
    forward = forward or adapter.forward_nested
    sums = {s: {"nll": 0.0, "agree": 0.0, "kl": 0.0, "hit": 0.0, "hit2": 0.0, "hit4": 0.0} for s in specs}
    count = 0
    adapter.model.eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if torch.device(device).type == "cuda" else torch.autocast("cpu", enabled=False)
    batches = range(0, len(examples), batch_size)
    with TrainProgress(len(batches), [], enabled=show_progress, description="eval") as progress:
        for i, start in enumerate(batches):
            batch = {k: v.to(device) for k, v in collate(examples[start:start + batch_size], pad_id).items()}
            with autocast:
                hidden = forward(batch["input_ids"], batch["attention_mask"], specs)
            full_feats, targets = supervised_positions(hidden[full], batch["labels"])
            full_logits = logits_for(full, full_feats).float()  # [tokens, vocab]
            full_logp = F.log_softmax(full_logits, -1)  # [tokens, vocab]
            full_top1 = full_logits.argmax(-1)  # [tokens]
            for spec in specs:
                if spec == full:
                    logp = full_logp
                else:
                    feats, _ = supervised_positions(hidden[spec], batch["labels"])
                    logp = F.log_softmax(logits_for(spec, feats).float(), -1)  # [tokens, vocab]
                sums[spec]["nll"] += F.nll_loss(logp, targets, reduction="sum").item()
                top4 = logp.topk(min(4, logp.shape[-1]), -1).indices  # [tokens, 4], most probable first
                top1 = top4[:, 0]  # [tokens]
                sums[spec]["agree"] += (top1 == full_top1).sum().item()
                found = top4 == targets[:, None]  # [tokens, 4]
                sums[spec]["hit"] += found[:, 0].sum().item()
                sums[spec]["hit2"] += found[:, :2].any(-1).sum().item()
                sums[spec]["hit4"] += found.any(-1).sum().item()
                sums[spec]["kl"] += F.kl_div(logp, full_logp, log_target=True, reduction="sum").item()
            count += targets.numel()
            progress.update(i + 1, {})
    rows = []
    for spec in specs:
        loss = sums[spec]["nll"] / count
        rows.append({"spec": spec.label, **spec.to_dict(), "relative_cost": (costs or {}).get(spec.label),
                     "loss": loss, "perplexity": math.exp(min(loss, 80.0)),
                     "top1_accuracy": sums[spec]["hit"] / count, "top2_accuracy": sums[spec]["hit2"] / count,
                     "top4_accuracy": sums[spec]["hit4"] / count,
                     "top1_agreement": sums[spec]["agree"] / count, "kl_to_full": sums[spec]["kl"] / count,
                     "tokens": count})
    return rows


def generation_examples(generate: Callable[[list[list[int]]], list[list[int]]], prompts: list[list[int]],
                        batch_size: int = 16) -> list[Example]:
    """Each prompt followed by what `generate` (the full depth, greedy) continued it with; only the
    generated tokens are scored, so an exit's top-1 accuracy on these examples is its agreement
    with the full depth on the full depth's own output: what speculative decoding accepts."""
    examples = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        for prompt, new in zip(chunk, generate(chunk)):
            if new:
                examples.append(Example(input_ids=list(prompt) + list(new), labels=[IGNORE] * len(prompt) + list(new)))
    return examples


def add_generation_agreement(rows: list[dict[str, Any]], scored: list[dict[str, Any]]) -> None:
    """Copy the scores on the full depth's own generations into each exit's row. gen_top2 / gen_top4: the
    full depth's token is among the exit's 2 / 4 most probable, the acceptance a draft tree that offers
    that many candidates at a position would see there (a chain of single drafts sees gen_agreement)."""
    for row, s in zip(rows, scored):
        row.update(gen_agreement=s["top1_accuracy"], gen_top2=s["top2_accuracy"], gen_top4=s["top4_accuracy"],
                   gen_kl=s["kl_to_full"], gen_tokens=s["tokens"])


def write_report(rows: list[dict[str, Any]], output: str | os.PathLike, title: str = "") -> Path:
    """Write eval.json and eval.png (relative cost vs. held-out loss) into `output`, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(output)
    with atomic_dir(out, merge=True) as tmp:
        (tmp / "eval.json").write_text(json.dumps(rows, indent=2) + "\n")
        fig, ax = plt.subplots(figsize=(5, 3.5))
        xs = [r["relative_cost"] if r["relative_cost"] is not None else i for i, r in enumerate(rows)]
        ax.plot(xs, [r["loss"] for r in rows], marker="o")
        for x, r in zip(xs, rows):
            ax.annotate(r["spec"].split("=")[-1], (x, r["loss"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("relative cost (FLOPs per token)")
        ax.set_ylabel("held-out loss (nats/token)")
        ax.set_title(title or "cost vs. quality per exit")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(tmp / "eval.png", dpi=120)
        plt.close(fig)
    return out
