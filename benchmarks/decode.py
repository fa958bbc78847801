"""Decode speed of one SoFT checkpoint: HF generate vs the manyinone runtime (full, budget 0.5, exported
half depth), self-speculative decoding (auto-tuned, stored in the checkpoint) vs plain greedy and vs HF
`assistant_early_exit`, and token-for-token equality of speculative and plain greedy output.

Batch 1, greedy, every generation forced to `--new-tokens` (EOS does not stop it). Prefill and decode
are timed separately after warm-up, with device synchronisation; figures are medians over prompts x
repeats. The results table is printed last (and written to --out as JSON).

    python benchmarks/decode.py --ckpt /root/quality/soft --prompts /root/alpaca_2000.json   # GPU
    python benchmarks/decode.py --smoke                                                       # CPU, tiny model

`--suite runtime` runs the runtime suite instead (benchmarks/decode_suite.py: eager vs fused runtime vs
HF static+compile vs HF default, SmolLM2 and the 7B shape, kernels per layer):

    python benchmarks/decode.py --suite runtime --model /root/smollm2-hf    # GPU, ~5 min
    python benchmarks/decode.py --suite runtime --tiny --device cpu         # CPU check
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from manyinone.io.api import open_checkpoint
from manyinone.runtime import Runtime
from manyinone.runtime.tune import autotune, instruction_prompts, store_choice

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def smoke_checkpoint(folder: Path, hidden: int = 64, intermediate: int = 128, exit_heads: str | None = None) -> Path:
    """A tiny random 8-layer LLaMA saved as a manyinone checkpoint with exits 2,4,6,8 (no training); with
    `exit_heads` (a registered kind, e.g. "translator"), per-exit heads of that kind, nudged off their
    initialisation so that exits drafting through them differ from the shared head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from manyinone.io.checkpoint import build_index, save_checkpoint
    from manyinone.core.registry import adapter_for

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers import make_char_tokenizer  # the test suite's character tokenizer: no hub access

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model = LlamaForCausalLM(config).eval()
    adapter = adapter_for(model)
    space = adapter.space({"depth": [2, 4, 6, 8]})
    index = build_index(adapter, space, train={"template": "alpaca"})
    heads = None
    if exit_heads is not None:
        from manyinone.train.exit_heads import for_adapter

        heads = for_adapter(adapter, exit_heads, space)
        with torch.no_grad():
            for p in heads.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    return save_checkpoint(model, make_char_tokenizer(), index, folder, exit_heads=heads)


def runtime_rows(rt: Runtime, prompts, new: int, repeats: int, **kwargs) -> dict:
    """Median prefill ms and decode tokens/s of `rt.generate` over prompts x repeats (after one warm-up)."""
    rt.generate([prompts[0]], max_new_tokens=min(new, 24), stop_ids=set(), **kwargs)  # records CUDA graphs
    prefill, decode, outs, stats = [], [], [], []
    for p in prompts:
        for _ in range(repeats):
            g = rt.generate([p], max_new_tokens=new, stop_ids=set(), **kwargs)
            prefill.append(g.prefill_s * 1e3)
            decode.append(g.decode_tokens_per_s)
        outs.append(g.tokens[0])
        stats.append(g.stats)
    row = {"prefill_ms": statistics.median(prefill), "decode_tok_s": statistics.median(decode), "tokens": outs}
    if kwargs.get("speculative"):
        drafted = sum(s["drafted"] for s in stats)
        row["acceptance"] = sum(s["accepted"] for s in stats) / max(drafted, 1)
        row["tokens_per_round"] = sum(len(o) - 1 for o in outs) / max(sum(s["rounds"] for s in stats), 1)
    return row


def hf_rows(model, prompts, new: int, repeats: int, **kwargs) -> dict:
    """HF generate: prefill = a 1-token generate, decode tokens/s = (new - 1) / (time(new) - time(1))."""
    device = next(model.parameters()).device

    def timed(ids, n):
        sync(device)
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, **kwargs)
        sync(device)
        return time.perf_counter() - start

    first = torch.tensor([prompts[0]], device=device)
    timed(first, 8)  # warm-up
    prefill, decode = [], []
    for p in prompts:
        ids = torch.tensor([p], device=device)
        for _ in range(repeats):
            one, many = timed(ids, 1), timed(ids, new)
            prefill.append(one * 1e3)
            decode.append((new - 1) / max(many - one, 1e-9))
    return {"prefill_ms": statistics.median(prefill), "decode_tok_s": statistics.median(decode)}


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[int, float]:
    """(prompts whose outputs are identical, mean fraction of tokens before the first difference)."""
    same = sum(x == y for x, y in zip(a, b))
    prefix = []
    for x, y in zip(a, b):
        n = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
        prefix.append(n / max(len(x), 1))
    return same, sum(prefix) / len(prefix)


def guarded(name: str, fn, results: dict, errors: dict):
    """Run one measurement; a failure is recorded and reported instead of ending the benchmark."""
    try:
        results[name] = fn()
    except Exception as exc:  # report and go on: one broken baseline must not hide the others
        errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        traceback.print_exc(limit=3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", help="SoFT checkpoint folder")
    parser.add_argument("--prompts", help="Alpaca-style .json of instructions")
    parser.add_argument("--rows", default="1800:2000", help="held-out record slice")
    parser.add_argument("--count", type=int, default=8, help="prompts timed")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 256 (128 with --suite runtime)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    parser.add_argument("--budget", type=float, default=0.5, help="the in-runtime / exported budget compared")
    parser.add_argument("--hf-prompts", type=int, default=2, help="prompts for the (slow) HF baselines; 0 skips them")
    parser.add_argument("--hf-exits", default="6,12,18", help="HF assistant_early_exit values")
    parser.add_argument("--tune-prompts", type=int, default=3)
    parser.add_argument("--tune-tokens", type=int, default=96)
    parser.add_argument("--skip-tune", action="store_true",
                        help="use the draft settings already stored in the checkpoint (e.g. for a --compile run)")
    parser.add_argument("--no-store", action="store_true", help="do not write the tuned choice into the checkpoint")
    parser.add_argument("--compile", action="store_true", help="torch.compile each segment before recording its graph")
    parser.add_argument("--no-graphs", action="store_true", help="eager decode steps (no CUDA graphs)")
    parser.add_argument("--smoke", action="store_true", help="tiny random model on CPU, few tokens: checks the script")
    parser.add_argument("--out", default=None, help="write results JSON here")
    parser.add_argument("--suite", choices=["speculative", "runtime"], default="speculative",
                        help="runtime: the decode runtime suite (benchmarks/decode_suite.py)")
    parser.add_argument("--model", help="--suite runtime: SmolLM2 as an HF folder")
    parser.add_argument("--tiny", action="store_true", help="--suite runtime: tiny random models (a CPU check)")
    parser.add_argument("--device", default="auto", help="--suite runtime: cuda, cpu or auto")
    parser.add_argument("--prompt-len", type=int, default=64, help="--suite runtime: prompt tokens")
    parser.add_argument("--only", default=None, help="--suite runtime: comma-separated words; run only rows "
                        "whose 'model bBATCH method' contains one")
    parser.add_argument("--time-budget", type=float, default=300.0,
                        help="--suite runtime: seconds after which the remaining rows are skipped")
    args = parser.parse_args()
    if args.suite == "runtime":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from decode_suite import run_suite

        args.new_tokens = args.new_tokens or 128
        return run_suite(args)
    args.new_tokens = args.new_tokens or 256

    if args.smoke:
        torch.set_num_threads(1)
        tmp = tempfile.mkdtemp()
        args.ckpt = str(smoke_checkpoint(Path(tmp) / "smoke"))
        args.prompts = args.prompts or "demo"
        args.rows, args.count, args.new_tokens, args.repeats = None, 2, 24, 1
        args.hf_prompts, args.hf_exits, args.tune_prompts, args.tune_tokens = 1, "2", 2, 12
        args.dtype = "float32"
    if not args.ckpt or not args.prompts:
        parser.error("--ckpt and --prompts are required (or --smoke)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    graphs = device == "cuda" and not args.no_graphs
    compile_fn = None
    if args.compile:
        torch._dynamo.config.cache_size_limit = 256
        compile_fn = torch.compile
    dtype = DTYPES[args.dtype]
    results: dict = {}
    errors: dict = {}

    nested = open_checkpoint(args.ckpt, dtype=dtype, device=device)
    opts = dict(graphs=graphs, compile_fn=compile_fn)
    probe = Runtime.from_nested(nested, max_len=8, graphs=False)
    prompts = instruction_prompts(probe, args.prompts, args.rows, args.count)
    max_len = max(len(p) for p in prompts) + args.new_tokens + 32
    rt = Runtime.from_nested(nested, max_len=max_len, **opts)
    depth_b = rt.depth_for(args.budget)
    print(f"{args.ckpt}: {rt.num_layers} layers, exits {rt.exits()}, budget {args.budget} -> depth {depth_b}; "
          f"{len(prompts)} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens; {args.dtype} on {device}"
          f" ({torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}), graphs={graphs}, compile={args.compile}",
          flush=True)

    guarded("runtime full", lambda: runtime_rows(rt, prompts, args.new_tokens, args.repeats), results, errors)
    guarded(f"runtime budget {args.budget}", lambda: runtime_rows(rt, prompts, args.new_tokens, args.repeats,
                                                                   budget=args.budget), results, errors)
    sub = nested.sub_model(nested.spec_for(args.budget))
    sub_rt = Runtime(sub, nested.tokenizer, None, max_len=max_len, **opts)
    guarded(f"exported depth {depth_b}", lambda: runtime_rows(sub_rt, prompts, args.new_tokens, args.repeats),
            results, errors)

    tune_prompts = prompts[: args.tune_prompts]
    if args.skip_tune:
        stored = ((nested.index.get("runtime") or {}).get("speculative")) or {}
        if not stored:
            errors["autotune"] = "--skip-tune: the checkpoint holds no tuned draft settings; run once without it"
        results["autotune"] = {**stored, "trials": []} if stored else None
        args.no_store = True
    else:
        guarded("autotune", lambda: autotune(rt, tune_prompts, args.tune_tokens), results, errors)
    choice = results.get("autotune")
    if choice:
        print(f"auto-tune: draft exit {choice['draft_depth']}, {choice['draft_tokens']} tokens "
              f"({choice.get('speedup', 0):.2f}x when tuned)", flush=True)
        if not args.no_store:
            store_choice(args.ckpt, choice)
        spec_kw = dict(speculative=True, draft_depth=choice["draft_depth"], draft_tokens=choice["draft_tokens"])
        guarded("runtime speculative", lambda: runtime_rows(rt, prompts, args.new_tokens, args.repeats, **spec_kw),
                results, errors)
    if "runtime speculative" in results and "runtime full" in results:
        results["bf16 agreement" if dtype != torch.float32 else "agreement"] = agreement(
            results["runtime speculative"]["tokens"], results["runtime full"]["tokens"])

    # Float32 equality of speculative vs plain greedy, every prompt (a second, float32 copy of the model).
    if choice:
        def float32_equality():
            full32 = open_checkpoint(args.ckpt, dtype=torch.float32, device=device)
            rt32 = Runtime.from_nested(full32, max_len=max_len, **opts)
            plain = rt32.generate(prompts[:1], max_new_tokens=8, stop_ids=set())  # warm-up
            plain = [rt32.generate([p], max_new_tokens=args.new_tokens, stop_ids=set()).tokens[0] for p in prompts]
            spec = [rt32.generate([p], max_new_tokens=args.new_tokens, stop_ids=set(), **spec_kw).tokens[0]
                    for p in prompts]
            del rt32, full32
            return agreement(spec, plain)

        guarded("float32 agreement", float32_equality, results, errors)

    if args.hf_prompts:
        hf_p = prompts[: args.hf_prompts]
        guarded("HF generate full", lambda: hf_rows(nested.model, hf_p, args.new_tokens, 1), results, errors)
        guarded(f"HF generate exported depth {depth_b}", lambda: hf_rows(sub, hf_p, args.new_tokens, 1), results, errors)
        for n in [int(x) for x in args.hf_exits.split(",") if x.strip()]:
            guarded(f"HF assistant_early_exit={n}", lambda n=n: hf_rows(nested.model, hf_p, args.new_tokens, 1,
                                                                       assistant_early_exit=n), results, errors)

    print_table(results, errors, args, depth_b)
    if args.out:
        Path(args.out).write_text(json.dumps({"results": results, "errors": errors}, indent=1, default=str))


def print_table(results: dict, errors: dict, args, depth_b: int) -> None:
    full = results.get("runtime full", {}).get("decode_tok_s")
    hf_full = results.get("HF generate full", {}).get("decode_tok_s")
    exported = results.get(f"exported depth {depth_b}", {}).get("decode_tok_s")
    print(f"\n| method | prefill ms | decode tok/s | vs runtime full | vs HF full | notes |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        if not isinstance(r, dict) or "decode_tok_s" not in r:
            continue
        rate = r["decode_tok_s"]
        notes = []
        if "acceptance" in r:
            notes.append(f"acceptance {r['acceptance']:.2f}, {r['tokens_per_round']:.2f} tok/round")
        if name.startswith("runtime budget") and exported:
            notes.append(f"{rate / exported:.3f}x of exported")
        vs_rt = f"{rate / full:.2f}x" if full else "-"
        vs_hf = f"{rate / hf_full:.2f}x" if hf_full else "-"
        print(f"| {name} | {r['prefill_ms']:.1f} | {rate:.1f} | {vs_rt} | {vs_hf} | {'; '.join(notes)} |")
    for name in ("agreement", "bf16 agreement", "float32 agreement"):
        if name in results:
            same, prefix = results[name]
            print(f"| speculative == plain greedy ({name}) | | | | | {same}/{len(results['runtime full']['tokens'])} "
                  f"prompts identical, mean matched prefix {prefix:.3f} |")
    choice = results.get("autotune")
    if choice:
        print(f"| auto-tuned draft | | | | | exit {choice['draft_depth']}, {choice['draft_tokens']} tokens, "
              f"stored={not args.no_store} |")
    for name, err in errors.items():
        print(f"| {name} | FAILED | | | | {err} |")


if __name__ == "__main__":
    main()
