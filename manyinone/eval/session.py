"""Glue for the CLI's read-side commands: open a model for evaluation or generation."""

from __future__ import annotations

from pathlib import Path

import torch

from manyinone.io.api import NestedModel, load, open_checkpoint
from manyinone.io.checkpoint import build_index, is_checkpoint, read_index, recover_interrupted, resolve
from manyinone.train.data import encode_prompt
from manyinone.core.space import NestedSpace, SubnetSpec
from manyinone.core.errors import ManyinoneError
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
    index = build_index(nested.adapter, space, metric=nested.index.get("metric", "flops"))
    costs = {SubnetSpec(e["spec"]).label: e["relative"][index["metric"]] for e in index["specs"]}
    return nested, space, costs, dev


def generate_text(ckpt: Path, prompt: str, budget: float | None, max_new_tokens: int, temperature: float,
                  top_p: float, template: str | None, seed: int) -> tuple[str, SubnetSpec]:
    """Generate from the sub-model fitting `budget`; the prompt is wrapped in the training template."""
    from transformers import AutoTokenizer

    index = read_index(ckpt)
    resolve(index, budget)  # a bad budget fails before any weights load
    model = load(ckpt, budget)
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt), trust_remote_code=False)  # `load` verified the folder
    template = template or index.get("train", {}).get("template", "alpaca")
    ids = encode_prompt({"instruction": prompt, "input": "", "output": ""}, tokenizer, template)
    inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    limit = getattr(model.config, "max_position_embeddings", None)
    prompt_len = len(ids)
    if limit is not None and prompt_len + max_new_tokens > limit:
        raise ManyinoneError(f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens exceeds the context limit "
                             f"of {limit} tokens; shorten the prompt or lower --max-new-tokens")
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                         **sampling)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True), model.manyinone_spec


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
