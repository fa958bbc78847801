"""Pick the self-speculation draft exit and draft length by timing a few prompts; store the choice.

The choice lives in the checkpoint's `manyinone.json` under "runtime" -> "speculative", where
`Runtime` finds it (explicit draft settings in a call still win).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from manyinone.checkpoint import INDEX_FILE, read_index
from manyinone.errors import ManyinoneError
from manyinone.runtime.generate import Generation, Runtime

DRAFT_LENGTHS = (2, 3, 4, 6, 8)


def instruction_prompts(runtime: Runtime, data: str, rows: str | None, count: int) -> list[list[int]]:
    """Token ids of the first `count` instructions of a data set, wrapped in the checkpoint's training
    template (what the model saw in training), answers left out."""
    from manyinone.data import load_records, prompt_and_response

    template = ((runtime.index or {}).get("train") or {}).get("template", "alpaca")
    records = load_records(data, rows)[:count]
    if not records:
        raise ManyinoneError(f"data {data!r} rows {rows!r} hold no records; need at least one prompt")
    tok = runtime.tokenizer
    texts = [prompt_and_response(r, tok, template)[0] for r in records]
    return [tok(t, add_special_tokens=template != "chat")["input_ids"] for t in texts]


def decode_rate(runtime: Runtime, prompts: list[list[int]], max_new_tokens: int, budget: float | None = None,
                **kwargs: Any) -> tuple[float, list[Generation]]:
    """Decode tokens/s (prefill excluded) over `prompts`, one at a time, never stopping early."""
    runs = [runtime.generate([p], budget, max_new_tokens, stop_ids=set(), **kwargs) for p in prompts]
    tokens = sum(len(g.tokens[0]) - 1 for g in runs)
    seconds = sum(g.decode_s for g in runs)
    return (tokens / seconds if seconds > 0 else 0.0), runs


def autotune(runtime: Runtime, prompts: list[list[int]], max_new_tokens: int = 64, budget: float | None = None,
             draft_depths: list[int] | None = None, draft_lengths: tuple[int, ...] = DRAFT_LENGTHS) -> dict[str, Any]:
    """Time plain greedy decoding and every (draft exit, draft length) pair; return the fastest pair.

    Default draft exits: the checkpoint's trained exits shallower than the verifying depth. Each setting
    runs once untimed first (that records its CUDA graphs).
    """
    depth = runtime.depth_for(budget)
    depths = draft_depths or [e for e in runtime.exits() if e < depth]
    if not depths:
        raise ManyinoneError(f"no draft exit shallower than depth {depth}; give draft depths explicitly")
    warm = prompts[:1]
    decode_rate(runtime, warm, 8, budget)
    baseline, _ = decode_rate(runtime, prompts, max_new_tokens, budget)
    trials = []
    for n in depths:
        for k in draft_lengths:
            settings = dict(speculative=True, draft_depth=n, draft_tokens=k)
            decode_rate(runtime, warm, 2 * k + 2, budget, **settings)
            rate, runs = decode_rate(runtime, prompts, max_new_tokens, budget, **settings)
            drafted = sum(g.stats["drafted"] for g in runs)
            trials.append({"draft_depth": n, "draft_tokens": k, "tokens_per_s": rate,
                           "acceptance": sum(g.stats["accepted"] for g in runs) / max(drafted, 1)})
    best = max(trials, key=lambda t: t["tokens_per_s"])
    return {"depth": depth, **best, "baseline_tokens_per_s": baseline,
            "speedup": best["tokens_per_s"] / baseline if baseline else 0.0,
            "device": str(runtime.device), "dtype": str(runtime.stack.dtype).replace("torch.", ""),
            "prompts": len(prompts), "max_new_tokens": max_new_tokens, "trials": trials}


def store_choice(ckpt: str | os.PathLike, choice: dict[str, Any]) -> Path:
    """Write `choice` into the checkpoint's budget index (manyinone.json) and its entry in checksums.json,
    both in one commit (`integrity.replace_files_together`): a kill at any point leaves the old pair or
    the new one. The checkpoint is verified first, so a damaged one is never re-blessed."""
    from manyinone.integrity import CHECKSUMS_FILE, replace_files_together, verify_checksums

    folder = Path(ckpt)
    index = read_index(folder)  # also completes a commit an earlier, killed call left
    target = folder / INDEX_FILE
    if not target.is_file():
        raise ManyinoneError(f"checkpoint {str(ckpt)!r} has no {INDEX_FILE} to record the tuned settings in")
    listed = verify_checksums(folder)
    keep = ("depth", "draft_depth", "draft_tokens", "tokens_per_s", "baseline_tokens_per_s", "speedup",
            "acceptance", "device", "dtype", "prompts", "max_new_tokens")
    index.setdefault("runtime", {})["speculative"] = {k: choice[k] for k in keep if k in choice}
    text = json.dumps(index, indent=2) + "\n"
    texts = {INDEX_FILE: text}
    if listed:
        listing = json.loads((folder / CHECKSUMS_FILE).read_text(encoding="utf-8"))
        data = text.encode("utf-8")
        listing[INDEX_FILE] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        texts[CHECKSUMS_FILE] = json.dumps(listing, indent=1) + "\n"
    replace_files_together(folder, texts)
    return target
