"""QA answers through the decode runtime against the old HF-generate path, side by side on one model.

`manyinone eval --qa` now answers through the runtime (`eval.tasks.qa_answers`: batched, left-padded,
CUDA graphs on CUDA). This answers the same questions greedily at every exit both ways, in float32 (the
old path: each exit's extracted HF model, `generate` on left-padded batches, the same stop tokens),
and prints per exit the fraction of answers that are equal, each path's seconds and their ratio,
with a table last.

  python benchmarks/qa_parity.py --model /root/smollm2-hf --exits 10,20,30 --data /root/data/alpaca_2000.json
  python benchmarks/qa_parity.py --tiny --device cpu     # checks the script on a tiny random model
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import smoke_checkpoint, sync  # noqa: E402  (the tiny checkpoint and device sync of decode.py)

from manyinone.eval.session import load_for_eval  # noqa: E402
from manyinone.eval.tasks import qa_answers, qa_prompt, qa_runtime  # noqa: E402
from manyinone.train.data import encode_prompt, load_records  # noqa: E402


def hf_answers(nested, spec, prompts, batch_size, new_tokens, stop_ids) -> list[str]:
    """The path QA took before: the exit's extracted HF model, left-padded batches, HF greedy."""
    tokenizer, model = nested.tokenizer, nested.sub_model(spec).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    answers = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        longest = max(map(len, chunk))
        ids = torch.tensor([[pad] * (longest - len(p)) + p for p in chunk], device=device)  # [batch, longest]
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in chunk], device=device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=pad, eos_token_id=sorted(stop_ids))
        answers += tokenizer.batch_decode(out[:, longest:], skip_special_tokens=True)
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="HF folder or manyinone checkpoint")
    parser.add_argument("--exits", default=None, help="depth exits, e.g. 10,20,30 (default: the checkpoint's)")
    parser.add_argument("--data", default="demo", help="alpaca records whose instructions are the questions")
    parser.add_argument("--count", type=int, default=64, help="questions")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--template", default="alpaca")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tiny", action="store_true", help="a tiny random checkpoint: checks the script")
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory()
    source = str(smoke_checkpoint(Path(tmp.name) / "tiny")) if args.tiny else args.model
    if source is None:
        parser.error("give --model (or --tiny)")
    exits = [int(e) for e in args.exits.split(",")] if args.exits else None
    nested, space, _, device = load_for_eval(source, exits, args.device)
    records = load_records(args.data, None)[:args.count]
    questions = [{"question": r["instruction"], "golden_answers": ["-"]} for r in records]
    prompts = [encode_prompt(qa_prompt(q), nested.tokenizer, args.template) for q in questions]
    stop = qa_runtime(nested, prompts, args.batch_size, args.new_tokens).default_stop_ids()
    print(f"{len(questions)} questions, {args.new_tokens} new tokens, batch {args.batch_size}, {device}, float32; "
          f"specs {[s.label for s in space.specs()]}", flush=True)

    qa_answers(nested, space, questions[:2], args.template, 2, 2)  # warm-up: first-call costs, CUDA graphs
    sync(device)
    started = time.perf_counter()
    runtime = qa_answers(nested, space, questions, args.template, args.batch_size, args.new_tokens)
    sync(device)
    runtime_s = time.perf_counter() - started
    rows = []
    for spec in space.specs():
        sync(device)
        started = time.perf_counter()
        hf = hf_answers(nested, spec, prompts, args.batch_size, args.new_tokens, stop)
        sync(device)
        hf_s = time.perf_counter() - started
        equal = sum(a == b for a, b in zip(runtime[spec.label], hf)) / len(hf)
        first_diff = next((i for i, (a, b) in enumerate(zip(runtime[spec.label], hf)) if a != b), None)
        rows.append((spec.label, equal, hf_s, first_diff))
        print(f"{spec.label}: answers equal {equal:.3f}; HF {hf_s:.2f} s"
              + (f"; first differing question {first_diff}: runtime {runtime[spec.label][first_diff][:60]!r} "
                 f"vs HF {hf[first_diff][:60]!r}" if first_diff is not None else ""), flush=True)

    total_hf = sum(r[2] for r in rows)
    print(f"\nruntime, every exit together: {runtime_s:.2f} s; HF, every exit: {total_hf:.2f} s; "
          f"HF / runtime = {total_hf / runtime_s:.2f}x")
    print("\n| spec | answers equal (runtime vs HF greedy) | HF s |")
    print("| --- | --- | --- |")
    for label, equal, hf_s, _ in rows:
        print(f"| {label} | {equal:.3f} | {hf_s:.2f} |")
    print(f"| all exits | {sum(r[1] for r in rows) / len(rows):.3f} | {total_hf:.2f} (runtime {runtime_s:.2f}) |")


if __name__ == "__main__":
    main()
