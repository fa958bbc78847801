"""Where `manyinone distill-data`'s sampling time goes: its sampler timed, then under torch.profiler.

The sampler is `distill_data.runtime_sampler` exactly as the CLI builds it (the runtime's decode steps
as CUDA graphs, temperature / top-p sampling, the cache sized to the job). Side by side in one process,
each after a warm-up batch of the same rows:
- before: the two cuts of 2026-12-03 switched off (transformers' own SDPA, which copies the KV cache
  to every query head, and top-p by a sort of the whole vocabulary);
- after: the runtime as it is (`runtime.attention.grouped_sdpa`, top-p on candidates);
then one profiled batch of `after`: the CUDA kernels that take the most time, so the sampler's cost
is cut where it is spent rather than where it is guessed.

GPU (H200, ~40 s):  python benchmarks/sampler_profile.py --model /root/smollm2-hf --data /root/data/alpaca_2000.json
CPU check:          python benchmarks/sampler_profile.py --model DIR --data FILE --device cpu --prompts 2 --samples 2 --max-new-tokens 4
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from manyinone.runtime import sampling, stack
from manyinone.runtime.generate import synchronize
from manyinone.train.data import resolve_template
from manyinone.train.distill_data import runtime_sampler
from manyinone.train.records import load_records


@contextlib.contextmanager
def switched_off():
    """The sampler as it was before grouped decode attention and candidate top-p (module globals the
    runtime reads at each call; restored on leaving)."""
    attention, threshold = stack.decode_attention, sampling.TOP_P_CANDIDATES_FROM
    stack.decode_attention = lambda config, grouped: contextlib.nullcontext()
    sampling.TOP_P_CANDIDATES_FROM = float("inf")
    try:
        yield
    finally:
        stack.decode_attention, sampling.TOP_P_CANDIDATES_FROM = attention, threshold


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="an HF folder (the teacher distill-data samples from)")
    parser.add_argument("--data", required=True, help="instruction records (alpaca JSON)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--prompts", type=int, default=64, help="distinct prompts in the batch")
    parser.add_argument("--samples", type=int, default=16, help="rows per prompt (gen16: 64 x 16 = batch 1024)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--top", type=int, default=25, help="kernels shown")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).to(args.device)
    records = load_records(args.data)[: args.prompts]
    template = resolve_template("auto", tokenizer)
    rows = [r for r in records for _ in range(args.samples)]  # sample-major as distill-data batches them
    device = torch.device(args.device)
    generated = []
    results = {}
    for mode in ("before", "after"):
        with switched_off() if mode == "before" else contextlib.nullcontext():
            sample = runtime_sampler(model, tokenizer, template, args.max_new_tokens, 0.8, 0.95,
                                     counter=generated.append, records=records, batch_size=len(rows))
            sample(rows, 0)  # warm-up: graphs captured, caches allocated
            synchronize(device)
            start = time.perf_counter()
            sample(rows, 1)
            synchronize(device)
            results[mode] = (generated[-1], time.perf_counter() - start)
    print(f"batch {len(rows)} ({args.prompts} prompts x {args.samples}), {args.max_new_tokens} new tokens, "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}\n")
    print("| sampler | tokens | s | tokens/s | ms per step | speed-up |\n| --- | --- | --- | --- | --- | --- |")
    base = results["before"][0] / results["before"][1]
    for mode, (tokens, seconds) in results.items():
        print(f"| {mode} | {tokens:,} | {seconds:.2f} | {tokens / seconds:,.0f} | "
              f"{1e3 * seconds / args.max_new_tokens:.1f} | {tokens / seconds / base:.2f}x |")
    activities = [torch.profiler.ProfilerActivity.CPU] + \
        ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        sample(rows, 2)
        synchronize(device)
    print("\nafter, one batch under the profiler:")
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=args.top, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
