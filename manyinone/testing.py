"""The adapter conformance suite: any adapter, built-in or third-party, runs it on a tiny model.

Modelled on peft's shared tester: one function checks every contract the core relies on, on a
model built from a small config (no download), and reports each check by name.

    parity      the full spec through the adapter equals plain HF logits
    exits       each spec's exit equals the model `extract(spec)` exports
    costs       params and FLOPs grow along every axis
    reload      save_checkpoint -> open_checkpoint gives the same logits for every spec
    runtime     the runtime's greedy decoding equals HF `generate` (adapters with a decoder stack)

Example (a pytest test in the adapter's own package):
    >>> from manyinone.testing import check_adapter
    >>> report = check_adapter(MyAdapter, MyConfig(num_hidden_layers=4, ...), tokenizer, workdir=tmp_path)
    >>> print(report)            # one line per check; raises AssertionError listing any that failed
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from manyinone.core.adapter import ModelAdapter
from manyinone.core.errors import ManyinoneError
from manyinone.core.registry import adapter_class
from manyinone.core.space import NestedSpace, SubnetSpec

TOL = 1e-4  # float32 on CPU: the same math in another order


@dataclass
class Report:
    adapter: str
    checks: list[tuple[str, bool, str]] = field(default_factory=list)

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append((name, ok, detail))

    @property
    def failed(self) -> list[str]:
        return [name for name, ok, _ in self.checks if not ok]

    def __str__(self) -> str:
        rows = [f"{'PASS' if ok else 'FAIL'}  {self.adapter}  {name:<8} {detail}" for name, ok, detail in self.checks]
        return "\n".join(rows)


@torch.no_grad()
def greedy_without_cache(model: nn.Module, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy continuation of `prompt` by full forwards with no cache: the oracle for cached decoding.

    Not HF `generate`: on a sliding-window model (Qwen2 with `use_sliding_window`) generate's cached
    decoding parts from the model's own full forward once a sequence outgrows the window
    (transformers 5.17 and 5.24), while manyinone's runtime matches the full forward."""
    device = next(model.parameters()).device
    ids = list(prompt)
    for _ in range(new_tokens):
        logits = model(torch.tensor([ids], device=device), use_cache=False).logits  # [1, seq, vocab]
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def _inputs(vocab: int, seed: int = 0, batch: int = 3, seq: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (batch, seq), generator=g)  # [batch, seq], clear of the usual special ids
    mask = torch.ones_like(ids)
    mask[-1, -3:] = 0  # the last row right-padded
    return ids, mask


def _diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs()[mask.bool()].max())  # over real positions


def _specs_one_step_apart(space: NestedSpace) -> list[tuple[SubnetSpec, SubnetSpec, str]]:
    """Pairs (smaller, larger) of specs that differ in exactly one axis, by one choice."""
    pairs = []
    for a, b in itertools.permutations(space.specs(), 2):
        differ = [k for k in a if a[k] != b[k]]
        if len(differ) == 1 and a[differ[0]] < b[differ[0]]:
            choices = space.dims[differ[0]].choices
            if choices.index(b[differ[0]]) == choices.index(a[differ[0]]) + 1:
                pairs.append((a, b, differ[0]))
    return pairs


@torch.no_grad()
def check_adapter(adapter_cls: type[ModelAdapter], config, tokenizer, choices: Mapping[str, Sequence[int] | None] | None = None,
                  workdir: str | Path | None = None, seed: int = 0, raise_on_failure: bool = True) -> Report:
    """Run every conformance check of `adapter_cls` on a model built from `config` (see the module docstring).

    choices: axis -> trained sizes (default: every axis the adapter supports, at its defaults).
    tokenizer: saved with the checkpoint for the reload check. The adapter must be registered for
    `config.model_type` (the checkpoint reader finds it through the registry, as users' code does).
    """
    from transformers import AutoModelForCausalLM

    from manyinone.io.api import open_checkpoint
    from manyinone.io.checkpoint import build_index, save_checkpoint

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    adapter = adapter_cls(model)
    report = Report(adapter.name)
    space = adapter.space(dict(choices) if choices is not None else {axis: None for axis in adapter.axes})
    specs, full = space.specs(), space.full()
    ids, mask = _inputs(config.vocab_size, seed)

    def exit_of(spec: SubnetSpec) -> torch.Tensor:
        return adapter.exit_logits(adapter.forward_nested(ids, mask, [spec])[spec])  # [batch, seq, vocab]

    # parity: the full spec is the plain model
    want = model(input_ids=ids, attention_mask=mask).logits
    err = _diff(exit_of(full), want, mask)
    report.add("parity", err <= TOL, f"full spec {full.label}: max |adapter - HF| = {err:.2e}")

    # exits: each exit is the exported model; all exits of one pass equal their own passes
    together = adapter.forward_nested(ids, mask, specs)
    worst, label = 0.0, ""
    for spec in specs:
        exported = adapter.extract(spec).eval()(input_ids=ids, attention_mask=mask).logits
        for got in (adapter.exit_logits(together[spec]), exit_of(spec)):
            e = _diff(got, exported, mask)
            worst, label = (e, spec.label) if e > worst else (worst, label)
    report.add("exits", worst <= TOL, f"{len(specs)} specs: max |exit - extract(spec)| = {worst:.2e}"
                                      + (f" at {label}" if label else ""))

    # costs: strictly more params and FLOPs one choice up any axis
    bad = []
    pairs = _specs_one_step_apart(space)
    for a, b, axis in pairs:
        ca, cb = adapter.cost(a), adapter.cost(b)
        if not (ca.params < cb.params and ca.flops_per_token < cb.flops_per_token):
            bad.append(f"{a.label} -> {b.label}")
    report.add("costs", not bad, f"{len(pairs)} one-step pairs over axes {list(space.dims)}"
                                 + (f"; not growing: {bad[:3]}" if bad else ", all growing"))

    # reload: a saved checkpoint serves the same logits for every spec
    registered = adapter_class(config.model_type, list(space.dims))
    if registered is not adapter_cls:
        report.add("reload", False, f"the registry serves {registered.name!r} for {config.model_type!r} with axes "
                                    f"{list(space.dims)}; register {adapter.name!r} (manyinone.register_adapter)")
    else:
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            save_checkpoint(model, tokenizer, build_index(adapter, space), Path(tmp) / "ckpt")
            nested = open_checkpoint(Path(tmp) / "ckpt")
            worst = max(_diff(nested.sub_model(s)(input_ids=ids, attention_mask=mask).logits,
                              adapter.extract(s)(input_ids=ids, attention_mask=mask).logits, mask) for s in specs)
            report.add("reload", worst <= TOL and type(nested.adapter) is adapter_cls,
                       f"{len(specs)} specs: max |reloaded - original| = {worst:.2e}")

    # runtime: greedy decoding through the adapter's decoder stack equals the HF model's own greedy
    try:
        adapter.decoder_stack()
    except ManyinoneError as exc:
        report.add("runtime", True, f"skipped: {exc}")
    else:
        from manyinone.runtime.generate import Runtime

        rt = Runtime(model, tokenizer, None, max_len=64, graphs=False, adapter=adapter)
        prompts = [ids[0, :6].tolist(), ids[1, :4].tolist()]
        got = rt.generate(prompts, max_new_tokens=8, stop_ids=set()).tokens
        hf = [greedy_without_cache(model, p, 8) for p in prompts]
        report.add("runtime", got == hf, f"{len(prompts)} prompts x 8 greedy tokens "
                                         + ("identical to HF full forwards" if got == hf else f"differ: {got} vs {hf}"))
    if raise_on_failure and report.failed:
        raise AssertionError(f"adapter {adapter.name!r} fails {report.failed}:\n{report}")
    return report


__all__ = ["Report", "check_adapter", "greedy_without_cache"]
