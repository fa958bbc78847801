"""A step whose loss or gradient is not finite: found before the optimizer step, never written into the weights.

bf16 training has no loss scale to back off (fp16's GradScaler skips a step whose scaled gradients
overflowed and lowers the scale; with bf16's float32 range there is no overflow of that kind to
expect), so a NaN or inf here means something is broken: the data, the learning rate, a kernel,
or the model. The default is therefore to stop at the first such step with one line that says
which metric and which parameter went bad; the weights, the optimizer state and the last
complete checkpoint stay as they were. `nonfinite_skips=N` lets up to N such steps pass as
skipped steps (no update, like a GradScaler skip) for runs that meet a rare bad batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from manyinone.core.errors import ManyinoneError

# What the error suggests, cheapest check first.
_TRY = ("try: --dtype float32 (tells a bf16 problem from a data or model one), a lower --lr, "
        "--set loss_impl=plain, or --set nonfinite_skips=N to skip up to N such steps")


def grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The total L2 norm of `params`' gradients, without clipping them (clip_grad_norm_ would scale
    every gradient by a NaN norm and hide which one went bad first)."""
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        return torch.nn.utils.get_total_norm([p.grad for p in params])
    return torch.nn.utils.clip_grad_norm_(params, float("inf"))  # older torch: max_norm inf only measures


def clip_to(params: list[torch.Tensor], max_norm: float, norm: torch.Tensor) -> None:
    """clip_grad_norm_'s second half: scale the gradients to at most `max_norm`, given their finite `norm`."""
    if hasattr(torch.nn.utils, "clip_grads_with_norm_"):  # torch >= 2.6
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    else:
        torch.nn.utils.clip_grad_norm_(params, max_norm)


def nonfinite_metrics(metrics: Mapping[str, float]) -> list[str]:
    """Names of the losses (ce/…, kl/…, teacher_kl/…, loss) and grad_norm in `metrics` that are NaN or inf."""
    return [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]


def nonfinite_grads(named_params: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the parameters (in the model's order) whose gradient holds a NaN or inf. Under
    FSDP2 each rank checks its own shard. Only read on the failure path: one sync per tensor."""
    bad = []
    for name, p in named_params:
        grad = p.grad
        if grad is None:
            continue
        local = grad.to_local() if hasattr(grad, "to_local") else grad  # a DTensor's shard
        if not bool(torch.isfinite(local).all()):
            bad.append(name)
    return bad


def zero_embedding_starts(model, first_ids: Iterable[int]) -> dict[int, int]:
    """Of the token ids that begin a training row (`first_ids`, one per row), those whose input
    embedding is all zeros, with how many rows begin with each.

    Such a position attends only to itself, so its hidden state stays exactly zero through every layer,
    and every later token still reads its key and value. RMSNorm's backward at a zero vector scales the
    gradient by 1/sqrt(eps) (316 at eps 1e-5), once per layer: in a 40-layer model the gradient passed
    float32's range 17 layers down and step 1 ended as NaN (benchmarks/RESULTS.md). transformers zeroes the padding row of a
    freshly initialised model, so a random model whose pad token is also the BOS meets it; a
    pretrained checkpoint normally has no zero row."""
    counts: dict[int, int] = {}
    for t in first_ids:
        counts[t] = counts.get(t, 0) + 1
    weight = getattr(model.get_input_embeddings(), "weight", None)
    if not counts or weight is None or weight.is_meta:
        return {}
    ids = sorted(t for t in counts if 0 <= t < weight.shape[0])
    with torch.no_grad():
        rows = weight.detach()
        if hasattr(rows, "full_tensor"):  # sharded under torchrun (a DTensor): gather this one matrix, briefly
            rows = rows.full_tensor()
        zero = (rows[torch.tensor(ids, device=rows.device)] == 0).all(-1).tolist()
    return {t: counts[t] for t, z in zip(ids, zero) if z}


def zero_start_warning(model, tokenizer, first_ids: Iterable[int]) -> str | None:
    """The warning `zero_embedding_starts` calls for, naming the tokens, or None."""
    found = zero_embedding_starts(model, first_ids)
    if not found:
        return None
    named = ", ".join(f"id {t} ({tokenizer.convert_ids_to_tokens(t)!r}, {n} rows)" for t, n in found.items())
    return (f"warning: training rows begin with token(s) whose input embedding is all zeros: {named}; such a "
            "position stays zero in every layer, and RMSNorm's backward at zero scales its gradient by "
            "1/sqrt(eps) per layer, so a deep model's step 1 overflows to NaN; give the row values (e.g. a "
            "random model's padding row drawn like the others) or begin rows with another token")


def describe(step: int, metrics: Mapping[str, float], bad_metrics: list[str], bad_grads: list[str],
             shown: int = 3) -> str:
    """The one-line account of a non-finite step: which values, and which parameters' gradients.

    Backward runs from the loss down, and a NaN born in one layer spreads to every layer below it,
    so the deepest parameters with a bad gradient (the model's order reversed) point at its origin."""
    values = ", ".join(f"{k}={metrics[k]}" for k in bad_metrics)
    if not bad_grads:
        return f"step {step}: non-finite {values}"
    losses_finite = all(k == "grad_norm" for k in bad_metrics)
    deepest = ", ".join(reversed(bad_grads[-shown:]))
    return (f"step {step}: non-finite {values}{' with finite losses' if losses_finite else ''}; "
            f"{len(bad_grads)} parameter(s) got a non-finite gradient, the deepest (where backward met it first): "
            f"{deepest}")


def stop_error(summary: str, output: Path, checkpoints: list[Path], skipped: int, allowed: int) -> ManyinoneError:
    """The error that ends the run at a non-finite step: what happened, what was kept, what to try."""
    kept = (f"the weights were not updated; last complete checkpoint {str(checkpoints[-1])!r} is intact"
            if checkpoints else "the weights were not updated and no checkpoint was written")
    skips = f" ({skipped} such step(s) skipped before, nonfinite_skips={allowed})" if allowed else ""
    return ManyinoneError(f"{summary}{skips}; training stopped in {str(output)!r}: {kept}; {_TRY}")
