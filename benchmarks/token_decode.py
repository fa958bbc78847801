"""Decode speed of the token router against the static plan of the same cost, in one runtime, side by side.

Random weights (SmolLM2-135M's shape and a 7B LLaMA shape): the question is whether routing eats its
own savings, not quality. A budget's K=2 plans are uniform widths (w_lo, w_hi) with the budget's
heads; each token id goes to a plan through a fixed random table, and decoding samples (temperature 1)
so the tokens, and so the plans, really change from step to step. For each shape and batch:
- token: the token-routed stream (its measured average width and cost come back in its stats);
- static lo / mid / hi: the uniform plans at w_lo, (w_lo + w_hi) / 2 and w_hi, same runtime;
- ratio: token tok/s over the static rate interpolated at the token run's measured average cost;
- per-layer (batch 1): the design not taken, each layer choosing its width from the hidden state
  entering it, so the host reads the device once per layer before launching that layer.
Same process, same prompt, warm-up first, CUDA-synchronised timings; a table last.

GPU (H200, ~2 min):  python benchmarks/token_decode.py --out /root/token_decode.json
CPU check (tiny):    python benchmarks/token_decode.py --tiny --device cpu
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from manyinone.core.axes import as_plan
from manyinone.elastic.token_router import TokenRouting
from manyinone.runtime.generate import Runtime, synchronize
from manyinone.runtime.sampling import Sampling
from manyinone.runtime.token_routed import token_routed_stream

SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=300),
}


def build(shape: str, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    from manyinone_flextron import LlamaFlextronAdapter

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, rope_theta=10000.0)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    return model, LlamaFlextronAdapter(model)


def routing_of(adapter, w_lo: int, w_hi: int, vocab: int) -> TokenRouting:
    heads = adapter.num_heads
    plans = (as_plan(((w_lo, heads),) * adapter.num_layers), as_plan(((w_hi, heads),) * adapter.num_layers))
    table = torch.randint(0, 2, (vocab,), generator=torch.Generator().manual_seed(1))
    full = adapter.plan_cost(((adapter.intermediate, heads),) * adapter.num_layers).flops_per_token
    routing = TokenRouting(0.0, plans, table)
    return routing.priced(lambda p: adapter.plan_cost(p).flops_per_token / full)


@torch.no_grad()
def per_layer_run(rt, prompts, w_lo: int, w_hi: int, new: int, sampling: Sampling) -> None:
    """The other design: each layer picks its width from the hidden state entering it, which the host
    must read before it launches that layer (one sync and one segment call per layer per step)."""
    from manyinone.runtime.cache import left_pad
    from manyinone.runtime.sampling import choose

    heads, layers = rt.stack.adapter.num_heads, rt.num_layers
    runner = rt.runner(len(prompts))
    generator = torch.Generator(rt.device).manual_seed(sampling.seed)
    ids, pad = left_pad(prompts, 0, rt.device)
    logits = runner.prefill(layers, ids, pad, None)
    token, slot = choose(logits[:, -1], sampling, generator), ids.shape[1]
    for _ in range(new - 1):
        x = token[:, None]
        for i in range(layers):
            wide = bool((x.float().sum() if i == 0 else x[..., 0].float().sum()) > 0)  # the host sync per layer
            plan = rt._plan(((w_hi if wide else w_lo, heads),) * (i + 1))
            x, logits = runner(i, i + 1, x, rt._slots[slot: slot + 1], pad, head=i == layers - 1,
                               slots_end=slot + 1, plan=plan)
        token, slot = choose(logits[:, -1], sampling, generator), slot + 1


def timed(fn, repeats: int, device) -> float:
    fn()  # warm-up: graph capture for every shape this run meets
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def run_shape(shape: str, args, device, dtype) -> list[dict]:
    model, adapter = build(shape, device, dtype)
    rt = Runtime(model, None, None, adapter=adapter, max_len=args.prompt + args.new + 16, graphs=device.type == "cuda")
    vocab = model.config.vocab_size
    step = 64 if adapter.intermediate >= 1024 else 1  # GPU tiles for real shapes; any size for the tiny one
    w_lo = max(step, adapter.intermediate // 4 // step * step)
    w_hi = adapter.intermediate * 3 // 4 // step * step
    w_mid = (w_lo + w_hi) // 2 // step * step
    routing = routing_of(adapter, w_lo, w_hi, vocab)
    full = adapter.plan_cost(((adapter.intermediate, adapter.num_heads),) * adapter.num_layers).flops_per_token
    rows = []
    for batch in args.batches:
        prompts = torch.randint(3, vocab, (batch, args.prompt), generator=torch.Generator().manual_seed(2)).tolist()
        sampling = Sampling(temperature=1.0, seed=3)
        stats: dict = {}

        def token_run():
            stats.clear()
            for _ in token_routed_stream(rt, prompts, routing, args.new, sampling, set(), stats):
                pass

        entry = {"shape": shape, "batch": batch}
        seconds = timed(token_run, args.repeats, device)
        entry["token tok/s"] = batch * args.new / seconds
        entry["token avg cost"] = stats.get("average_cost")
        entry["mixed steps"] = stats.get("mixed_steps")
        entry["plan shares"] = [round(c / max(sum(stats["plan_counts"]), 1), 3) for c in stats["plan_counts"]]
        static = {}
        for name, width in (("lo", w_lo), ("mid", w_mid), ("hi", w_hi)):
            plan = ((width, adapter.num_heads),) * adapter.num_layers
            spec = {"width": width, "heads": adapter.num_heads}
            cost = adapter.plan_cost(plan).flops_per_token / full
            rate = batch * args.new / timed(lambda: rt.generate(prompts, None, args.new, sampling, set(), spec=spec),
                                            args.repeats, device)
            static[name] = (cost, rate)
            entry[f"static {name} (w={width}) tok/s"] = rate
        if batch == 1:  # per-layer choices (a host sync per layer), the design the plan set avoids
            entry["per-layer tok/s"] = batch * args.new / timed(
                lambda: per_layer_run(rt, prompts, w_lo, w_hi, args.new, sampling), args.repeats, device)
        # The static rate at the token run's measured average cost, interpolated between the two nearest plans.
        points = sorted(static.values())
        avg = entry["token avg cost"] or points[0][0]
        lo = max([p for p in points if p[0] <= avg] or [points[0]])
        hi = min([p for p in points if p[0] >= avg] or [points[-1]])
        equal = lo[1] if hi[0] == lo[0] else lo[1] + (hi[1] - lo[1]) * (avg - lo[0]) / (hi[0] - lo[0])
        entry["static at avg cost tok/s"] = equal
        entry["ratio"] = entry["token tok/s"] / equal
        rows.append(entry)
        print(json.dumps(entry), flush=True)
    del rt, model, adapter
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shapes", default="smollm2-135m,llama-7b")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="the tiny shape, few tokens (a CPU check)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.tiny:
        args.shapes, args.new, args.repeats, args.prompt = "tiny", 8, 1, 8
    args.batches = [int(b) for b in args.batches.split(",")]
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for shape in args.shapes.split(","):
        try:
            rows += run_shape(shape, args, device, dtype)
        except Exception as exc:  # report and keep the other shapes
            print(f"{shape}: error {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            rows.append({"shape": shape, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    print("\n| shape | batch | token tok/s | avg cost | plan shares | mixed steps | static at avg cost tok/s | ratio "
          "| per-layer (sync per layer) tok/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['shape']} | error: {r['error'][:80]} | | | | | | |")
            continue
        print(f"| {r['shape']} | {r['batch']} | {r['token tok/s']:,.1f} | {r['token avg cost']:.3f} | "
              f"{r['plan shares']} | {r['mixed steps']} | {r['static at avg cost tok/s']:,.1f} | {r['ratio']:.2f}x | "
              + (f"{r['per-layer tok/s']:,.1f} |" if "per-layer tok/s" in r else "— |"))


if __name__ == "__main__":
    main()
