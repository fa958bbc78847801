"""Glue for the CLI's read-side commands: open a model for evaluation or generation."""

from __future__ import annotations

from pathlib import Path

import torch

from manyinone.io.api import NestedModel, open_checkpoint
from manyinone.io.checkpoint import build_index, is_checkpoint, read_index, recover_interrupted, resolve
from manyinone.train.data import encode_prompt
from manyinone.core.space import NestedSpace, SubnetSpec
from manyinone.io.loading import load_pretrained
from manyinone.core.registry import adapter_for
from manyinone.core.device import pick_device


def load_for_eval(source: str, exits: list[int] | None, device: str = "auto"
                  ) -> tuple[NestedModel, NestedSpace, dict[str, float], torch.device]:
    """A manyinone checkpoint, or any model source (HF folder, .gguf, alias) scored at `exits`."""
    dev = pick_device(device)
    folder = Path(source)
    recover_interrupted(folder)
    if folder.is_dir() and is_checkpoint(folder):  # verified, even without its manyinone.json
        nested = open_checkpoint(folder, device=str(dev))
    else:
        model, tokenizer = load_pretrained(source)
        adapter = adapter_for(model.to(dev).eval())
        space = adapter.space({"depth": exits})
        nested = NestedModel(model, tokenizer, adapter, build_index(adapter, space))
    space = nested.adapter.space({"depth": exits}) if exits else nested.space
    heads = nested.exit_heads
    index = build_index(nested.adapter, space, metric=nested.index.get("metric", "flops"),
                        one_more_layer=heads.with_blocks() if heads is not None else ())
    costs = {SubnetSpec(e["spec"]).label: e["relative"][index["metric"]] for e in index["specs"]}
    return nested, space, costs, dev


def generate_text(ckpt: Path, prompt: str, budget: float | None, max_new_tokens: int, temperature: float,
                  top_p: float, template: str | None, seed: int, dtype: str = "float32",
                  device: str = "auto") -> tuple[str, SubnetSpec]:
    """Generate from the sub-model fitting `budget` through the runtime (the one generation path);
    the prompt is wrapped in the training template."""
    text, spec, _ = _runtime_generate(ckpt, prompt, budget, max_new_tokens, temperature, top_p, template, seed,
                                      None, dtype, device)
    return text, spec


def generate_speculative(ckpt: Path, prompt: str, budget: float | None, max_new_tokens: int, temperature: float,
                         top_p: float, template: str | None, seed: int, draft: dict, dtype: str = "float32",
                         device: str = "auto") -> tuple[str, SubnetSpec, dict]:
    """Self-speculative generation in the runtime; bad draft settings fail before any weights load.
    `draft`: `Runtime.generate`'s draft keywords (None = the checkpoint's tuned policy)."""
    return _runtime_generate(ckpt, prompt, budget, max_new_tokens, temperature, top_p, template, seed, draft,
                             dtype, device)


def _runtime_generate(ckpt, prompt, budget, max_new_tokens, temperature, top_p, template, seed, draft, dtype, device):
    from manyinone.runtime import Runtime, Sampling
    from manyinone.runtime.draft_policy import index_exits, validate
    from manyinone.runtime.generate import dtype_named

    index = read_index(ckpt)
    spec = resolve(index, budget)  # a bad budget fails before any weights load
    if draft is not None:
        validate(True, index_exits(index), int(spec["depth"]), draft.get("draft_depth"), draft.get("draft_tokens"),
                 draft.get("draft_threshold"), draft.get("adaptive_draft"))
    sampling = Sampling(temperature, top_p, seed)
    rt = Runtime.open(ckpt, dtype=dtype_named(dtype), device=device)
    template = template or index.get("train", {}).get("template", "alpaca")
    ids = encode_prompt({"instruction": prompt, "input": "", "output": ""}, rt.tokenizer, template)
    out = rt.generate([ids], budget, max_new_tokens, sampling, speculative=draft is not None, **(draft or {}))
    return rt.decode(out.tokens[0]), spec, out.stats


def answers_at_every_budget(ckpt: Path, prompt: str, max_new_tokens: int, template: str | None = None,
                            device: str = "auto") -> list[dict]:
    """The same prompt answered greedily by every sub-model of the index, cheapest first: one row each
    with its spec, relative cost, answer, new tokens and tokens per second (prefill included), through
    the decode runtime (one copy of the weights; each budget runs its own prefix of the layers)."""
    import time

    from manyinone.runtime.generate import Runtime

    runtime = Runtime.open(ckpt, device=device)
    index = runtime.index or {}
    template = template or index.get("train", {}).get("template", "alpaca")
    ids = encode_prompt({"instruction": prompt, "input": "", "output": ""}, runtime.tokenizer, template)
    metric = index.get("metric", "flops")
    entries = sorted(index.get("specs", []), key=lambda e: e["relative"][metric])
    runtime.generate([ids], max_new_tokens=2, spec=SubnetSpec(**entries[0]["spec"]))  # warm-up: first-call costs
    rows = []
    for entry in entries:
        spec = SubnetSpec(**entry["spec"])
        started = time.perf_counter()
        out = runtime.generate([ids], max_new_tokens=max_new_tokens, spec=spec)
        elapsed = time.perf_counter() - started
        tokens = out.tokens[0]
        rows.append({"spec": spec.label, "relative_cost": entry["relative"][metric], "text": runtime.decode(tokens),
                     "tokens": len(tokens), "tokens_per_s": len(tokens) / elapsed if elapsed > 0 else 0.0})
    return rows
