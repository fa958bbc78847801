"""Export parity on a trained checkpoint: every exported budget, loaded by plain transformers,
against the in-framework sub-model and the nested forward's exit (float32, max abs logit diff).

    python benchmarks/export_parity.py runs/quality/soft --out runs/parity
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import AutoModelForCausalLM

import manyinone
from manyinone.io.api import open_checkpoint
from manyinone.io.checkpoint import spec_costs
from manyinone.io.export import export_budget


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("ckpt")
    parser.add_argument("--prompt", default="Give three tips for staying healthy. Eat well, sleep enough and walk daily.")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    nested = open_checkpoint(args.ckpt)
    ids = nested.tokenizer(args.prompt, return_tensors="pt")["input_ids"]  # [1, seq]
    specs = list(spec_costs(nested.index).items())
    with torch.no_grad():
        hidden = nested.adapter.forward_nested(ids, torch.ones_like(ids), [s for s, _ in specs])
    print("| spec | budget | exported vs manyinone.load | exported vs nested exit |")
    print("| --- | --- | --- | --- |")
    worst = 0.0
    for spec, cost in specs:
        with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
            export_budget(args.ckpt, cost, f"{tmp}/out")
            plain = AutoModelForCausalLM.from_pretrained(f"{tmp}/out", dtype=torch.float32).eval()
            served = manyinone.load(args.ckpt, budget=cost)
            a = plain(ids).logits
            d1 = (a - served(ids).logits).abs().max().item()
            d2 = (a - nested.exit_logits(spec, hidden[spec])).abs().max().item()
            # Relative to the logits' scale: folding an exit's translator into its LM head (head·T)
            # changes the float32 summation order, so compare against the logits' own size.
            worst = max(worst, max(d1, d2) / a.abs().max().item())
            print(f"| {spec.label} | {cost:.3f} | {d1:.2e} | {d2:.2e} |")
    print(f"worst max abs diff / max abs logit: {worst:.2e} ({'PASS' if worst <= 1e-5 else 'FAIL'} at 1e-5)")


if __name__ == "__main__":
    main()
