"""Where `manyinone distill-data`'s sampling time goes: one batch of its sampler under torch.profiler.

The sampler is `distill_data.runtime_sampler` exactly as the CLI builds it (the runtime's decode steps
as CUDA graphs, temperature / top-p sampling, the cache sized to the job). One warm-up batch, then
one profiled batch of the same rows: tokens/s, the time per decode step, and the CUDA kernels that
take the most time (the table's last column says which Python op launched them), so the sampler's
cost can be cut where it is spent rather than where it is guessed.

GPU (H200, ~40 s):  python benchmarks/sampler_profile.py --model /root/smollm2-hf --data /root/data/alpaca_2000.json
CPU check:          python benchmarks/sampler_profile.py --model DIR --data FILE --device cpu --prompts 2 --samples 2 --max-new-tokens 4
"""

from __future__ import annotations

import argparse
import time

import torch

from manyinone.runtime.generate import synchronize
from manyinone.train.data import resolve_template
from manyinone.train.distill_data import runtime_sampler
from manyinone.train.records import load_records


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
    generated = []
    sample = runtime_sampler(model, tokenizer, template, args.max_new_tokens, 0.8, 0.95, counter=generated.append,
                             records=records, batch_size=len(rows))
    sample(rows, 0)  # warm-up: graphs captured, caches allocated
    device = torch.device(args.device)
    activities = [torch.profiler.ProfilerActivity.CPU] + \
        ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        sample(rows, 1)
        synchronize(device)
    seconds = time.perf_counter() - start
    tokens = generated[-1]
    print(f"batch {len(rows)} ({args.prompts} prompts x {args.samples}), {tokens} tokens in {seconds:.2f} s under the "
          f"profiler: {tokens / seconds:,.0f} tokens/s, {1e3 * seconds / args.max_new_tokens:.1f} ms per step")
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=args.top, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
