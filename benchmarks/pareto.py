"""Depth vs width vs both vs routed: one Pareto plot of dev loss against FLOPs and measured ms.

Trains each variant from the same pretrained model (in-process, `manyinone.train.loop`), evaluates every
sub-network on two slices of records (dev, which the summary chooses on, and held-out, which is only
reported beside it), measures a per-layer latency table on the device, trains a static router on the
width run, and times decoding of the exported half-width model against the full one.

One training signal for every variant (issue 19): `--set KEY=VALUE` reaches each variant's TrainConfig
and means what it means for `manyinone train` (it wins over this script's per-variant settings, the
flags given here win over it); `--variant-set NAME:KEY=VALUE` sets a field for one variant only:
    python benchmarks/pareto.py --model runs/sft --data alpaca_2000.json --epochs 2 --lr 3e-4 \
        --set teacher=runs/sft --set mix_data=runs/gen6/data.jsonl --set mix_ratio=0.75 \
        --set teacher_full_weight=3 --variant-set depth:exit_heads=translator

GPU (SmolLM2 + Alpaca, ~6 min on an H100):
    python benchmarks/pareto.py --model /root/smollm2-hf --data /root/alpaca_2000.json --out /root/pareto
CPU smoke test (tiny random model, demo data, ~1 min):
    python benchmarks/pareto.py --smoke --out runs/pareto-smoke
Writes <out>/results.json, <out>/results.md, <out>/pareto.png and <out>/latency.json.
(`--jobs N` trains N variants at once, each as its own `manyinone train --config` process.)

Router variants (all on the width run's model, frozen): `routed` (one plan per budget), `adaptive`
(one plan per prompt, from its mean embedding) and `token` (one of K plans per token,
manyinone.elastic.token_router). Routed points report the *measured* average cost of the dev tokens
they actually routed (FLOPs and latency-table ms), and the token router's share of each width per layer.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # router_points, pareto_variants beside this file
from manyinone.io.api import open_checkpoint
from manyinone.io.durable import write_text_durably
from manyinone.train.data import collate, load_records, tokenize_records
from manyinone.core.space import SubnetSpec
from manyinone.eval.evaluate import evaluate_exits
from manyinone.core.axes import PAIR_AXES, as_plan, encode_plan
from manyinone.elastic.latency import measure_latency, option_table, plan_ms, save_table
from manyinone.train.losses import supervised_positions
from manyinone.elastic.router import Router, RouterTraining, plan_relative_cost, train_router
from manyinone.core.device import pick_device
from pareto_variants import FLAG_DEFAULTS, flags_given, steps_seconds, train_variants, variant_configs

VARIANTS = ("depth", "width", "depth+width", "routed", "adaptive", "token", "token-joint")
ROUTER_BUDGETS = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
SIGNAL = ("model", "epochs", "lr", "warmup_steps", "teacher", "teacher_weight", "teacher_full_weight", "mix_data",
          "mix_ratio", "distill_weight", "exit_heads", "sampler")  # shown per variant in results.md


def loss_of_plan(adapter, plan, examples, pad_id, device, batch_size) -> float:
    """Mean response-token NLL of one per-layer plan (the router's static choice)."""
    total, count = 0.0, 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[start:start + batch_size], pad_id).items()}
            with autocast:
                hidden = adapter.forward_plan(batch["input_ids"], batch["attention_mask"], plan)
            feats, targets = supervised_positions(hidden, batch["labels"])
            logits = adapter.exit_logits(feats).float()  # [tokens, vocab]
            total += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            count += targets.numel()
    return total / count


def decode_rate(model, prompt_ids, batch: int, new_tokens: int, device, repeats: int) -> float:
    """Greedy tokens/s of plain `generate` for `batch` copies of a prompt (exactly new_tokens each)."""
    ids = prompt_ids.repeat(batch, 1).to(device)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  do_sample=False, pad_token_id=model.config.eos_token_id)
    model.generate(ids, **kwargs)  # warm-up: kernels, allocator
    rates = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        model.generate(ids, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rates.append(batch * new_tokens / (time.perf_counter() - start))
    return max(rates)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model")
    parser.add_argument("--data")
    parser.add_argument("--train-rows", default="0:1800")
    parser.add_argument("--eval-rows", default="1800:1900", help="dev slice: the summary chooses on it")
    parser.add_argument("--holdout-rows", default="1900:2000", help="held-out slice: reported beside dev, never "
                                                                    "used to choose ('' = none)")
    parser.add_argument("--out", default="runs/pareto")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--epochs", type=float, help=f"default {FLAG_DEFAULTS['epochs']}")
    parser.add_argument("--batch-size", type=int, help=f"default {FLAG_DEFAULTS['batch_size']}")
    parser.add_argument("--max-length", type=int, help=f"default {FLAG_DEFAULTS['max_length']}")
    parser.add_argument("--lr", type=float, help=f"default {FLAG_DEFAULTS['lr']}")
    parser.add_argument("--distill", type=float, help="self-distillation weight of the width variants (default 0.5)")
    parser.add_argument("--router-steps", type=int, default=150)
    parser.add_argument("--router-cost-weight", type=float, default=30.0, help="weight of the budget penalty")
    parser.add_argument("--router-metric", choices=["flops", "ms"], default="flops",
                        help="what the router's budgets measure: FLOPs, or the measured latency table")
    # SmolLM2's MLP (1536): 512 (9 heads) and 640 (6 heads) are the widest within half the params.
    parser.add_argument("--widths", default="192,384,512,640,768,1024,1280,1536",
                        help="MLP widths of the width variants ('' = the adapter's default)")
    parser.add_argument("--latency-repeats", type=int, default=10)
    parser.add_argument("--token-plans", type=int, default=4, help="token router: plans per budget")
    parser.add_argument("--joint-lr", type=float, default=1e-5, help="token-joint: the model's learning rate")
    parser.add_argument("--no-decode", action="store_true", help="skip the exported half-width decode timing")
    parser.add_argument("--token-steps", type=int, default=None, help="token router steps (default --router-steps)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a TrainConfig field for every variant, as `manyinone train --set` reads it, e.g. "
                             "teacher=runs/sft (the agreement recipe's teacher and data: issue 19's rerun)")
    parser.add_argument("--variant-set", action="append", default=[], metavar="NAME:KEY=VALUE",
                        help="a TrainConfig field for one variant, e.g. depth:exit_heads=translator")
    parser.add_argument("--jobs", type=int, default=1, help="variants trained at once (one GPU holds several)")
    parser.add_argument("--smoke", action="store_true", help="tiny random model (or --model) + demo data on CPU")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from helpers import build_tiny_model  # a 4-layer LLaMA and a character tokenizer

        torch.set_num_threads(1)
        args.model = args.model or str(build_tiny_model(out / "tiny-model"))  # --model: e.g. a tiny SFT run
        args.data, args.train_rows, args.eval_rows, args.holdout_rows = "demo", "0:300", "300:320", "320:340"
        args.batch_size = args.batch_size or 4
        args.max_length, args.router_steps, args.widths = args.max_length or 256, 5, ""
    elif not (args.model and args.data):
        parser.error("--model and --data are required (or --smoke)")
    device = pick_device("auto")
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    # Flags given here win over --set (as in `manyinone train`); the ones not given are defaults it replaces.
    given = flags_given(args)
    configs = variant_configs(args, given, variants, out)
    for key, value in FLAG_DEFAULTS.items():  # what evaluation and the routers use
        setattr(args, key, given.get(key, value))

    results: dict[str, dict] = {}
    latency = None
    eval_sets = None
    trained = train_variants(configs, args.jobs)
    for name in configs:
        run_dir, train_s = trained[name]
        nested = open_checkpoint(run_dir, device=str(device))
        adapter, index = nested.adapter, nested.index
        if eval_sets is None:
            eval_sets = {part: tokenize_records(load_records(args.data, rows), nested.tokenizer, args.max_length,
                                                "alpaca")
                         for part, rows in (("dev", args.eval_rows), ("holdout", args.holdout_rows)) if rows}
        # Per-exit modules (translators) score their own exits, as `manyinone eval` does.
        rows = {part: evaluate_exits(adapter, nested.space, examples, nested.tokenizer.pad_token_id, args.batch_size,
                                     device, logits_for=nested.exit_logits,
                                     forward=nested.forward_nested) for part, examples in eval_sets.items()}
        holdout = {r["spec"]: r["loss"] for r in rows.get("holdout", [])}
        by_label = {",".join(f"{k}={v}" for k, v in sorted(e["spec"].items())): e for e in index["specs"]}
        points = []
        if latency is None and name != "depth":
            # One latency table for every variant: every (width, heads) option of this space.
            space = nested.space
            options = [(w, h) for w in space.dims["width"].choices for h in space.dims["heads"].choices]
            if device.type == "cuda":
                adapter.model.to(torch.bfloat16)  # time bf16 weights, not per-call casts (evaluation is done)
            latency = measure_latency(adapter, options, batch=args.batch_size, seq=min(args.max_length, 512),
                                      repeats=2 if args.smoke else args.latency_repeats)
            save_table(latency, out / "latency.json")
        for r in rows["dev"]:
            entry = by_label[r["spec"]]
            points.append({"spec": r["spec"], "loss": r["loss"], "holdout_loss": holdout.get(r["spec"]),
                           "params": entry["relative"]["params"], "flops": entry["relative"]["flops"],
                           "plan": stored(adapter_plan(adapter, entry["spec"]))})
        steps, step_s = steps_seconds(run_dir)
        results[name] = {"points": points, "train_s": train_s, "steps": steps, "step_s": step_s, "run": str(run_dir),
                         "config": {k: v for k, v in configs[name].model_dump().items() if v is not None}}
        print(f"{name}: trained in {train_s:.0f} s ({steps} steps, {step_s:.0f} s of steps), "
              f"{len(points)} sub-networks evaluated", flush=True)
        write_outputs(out, results, latency, {})

    if "routed" in variants:
        started = time.perf_counter()
        nested = open_checkpoint(results["width"]["run"], device=str(device))
        adapter = nested.adapter
        space = nested.space
        options = [(w, h) for w in space.dims["width"].choices for h in space.dims["heads"].choices]
        table, rest = adapter.option_costs(options)
        if args.router_metric == "ms" and latency is not None:
            full_plan = [(adapter.intermediate, adapter.num_heads)] * adapter.num_layers
            table, rest = option_table(latency, options, adapter.num_layers, full_plan)  # budgets in measured ms
        budgets = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
        train_examples = tokenize_records(load_records(args.data, args.train_rows), nested.tokenizer, args.max_length, "alpaca")
        batches = [collate(train_examples[i:i + args.batch_size], nested.tokenizer.pad_token_id)
                   for i in range(0, len(train_examples) - args.batch_size + 1, args.batch_size)]
        torch.manual_seed(0)
        router = Router(adapter.num_layers, options)
        train_router(router, adapter, batches, table,
                     RouterTraining(budgets=budgets, steps=args.router_steps, lr=1e-2, fixed_cost=rest,
                                    cost_weight=args.router_cost_weight))
        flops_table, flops_rest = adapter.option_costs(options)
        params_table, params_rest = adapter.option_costs(options, metric="params")
        points = []
        for b in budgets:
            plan = router.plan(b)
            loss = {part: loss_of_plan(adapter, plan, examples, nested.tokenizer.pad_token_id, device, args.batch_size)
                    for part, examples in eval_sets.items()}
            points.append({"spec": f"router@{b}", "loss": loss["dev"], "holdout_loss": loss.get("holdout"),
                           "flops": plan_relative_cost(plan, flops_table, options, flops_rest),
                           "params": plan_relative_cost(plan, params_table, options, params_rest),
                           "plan": stored(plan)})
        results["routed"] = {"points": points, "train_s": time.perf_counter() - started, "run": results["width"]["run"]}
        print(f"routed: router trained and {len(points)} budgets evaluated", flush=True)
        write_outputs(out, results, latency, {})

    if {"adaptive", "token", "token-joint"} & set(variants):
        from router_points import adaptive_points, token_joint_points, token_points

        nested = open_checkpoint(results["width"]["run"], device=str(device))
        nested.index_path = results["width"]["run"]  # token-joint trains a fresh copy of the model
        train_examples = tokenize_records(load_records(args.data, args.train_rows), nested.tokenizer, args.max_length, "alpaca")
        batches = [collate(train_examples[i:i + args.batch_size], nested.tokenizer.pad_token_id)
                   for i in range(0, len(train_examples) - args.batch_size + 1, args.batch_size)]
        # token-joint last: it trains its own copy of the model, the others see the width run unchanged.
        for name, fn in (("adaptive", adaptive_points), ("token", token_points), ("token-joint", token_joint_points)):
            if name in variants:
                started = time.perf_counter()
                points = fn(nested, batches, eval_sets["dev"], ROUTER_BUDGETS, args, device, latency)  # dev only
                results[name] = {"points": points, "train_s": time.perf_counter() - started, "run": results["width"]["run"]}
                print(f"{name}: router trained and {len(points)} budgets evaluated", flush=True)
                for p in points:  # in the log at once: a run stopped later still reports these
                    print(json.dumps({k: v for k, v in p.items() if k not in ("plans", "plan")}), flush=True)

    decode = not args.no_decode and ("width" in results and device.type == "cuda" or args.smoke)
    speed = measure_decoding(results, out, args, device) if decode else {}
    write_outputs(out, results, latency, speed)
    print((out / "results.md").read_text())


def price_in_ms(results, latency) -> None:
    """Measured-ms axis: every plan priced with the latency table (same device, same shapes)."""
    full_layers = int(latency["num_layers"])
    full = max((tuple(map(int, k.split(","))) for k in latency["layer_ms"]), key=lambda o: (o[0], o[1]))
    full_ms = plan_ms(latency, [full] * full_layers)
    for res in results.values():
        for p in res["points"]:
            if "ms" not in p:  # routed-per-prompt/token points carry their measured average already
                p["ms"] = plan_ms(latency, [tuple(o) for o in p["plan"]])
            p["ms_rel"] = p["ms"] / full_ms


def write_outputs(out: Path, results, latency, speed) -> None:
    """results.json, results.md and the plot of what is finished so far (rewritten as each variant
    ends, so a run cut short still leaves the variants it finished)."""
    if latency is not None:
        price_in_ms(results, latency)
    summary = summarise(results)
    write_text_durably(out / "results.json", json.dumps({"variants": results, "summary": summary, "latency": latency,
                                                         "decode": speed}, indent=2) + "\n")
    write_markdown(out, results, summary, speed, latency)
    plot(out / "pareto.png", results)


def stored(plan) -> list[list[int]]:
    """A plan as results.json keeps it: (width, heads) per layer."""
    return encode_plan(as_plan(plan), PAIR_AXES)


def adapter_plan(adapter, spec: dict) -> tuple:
    if hasattr(adapter, "plan"):
        return adapter.plan(spec)
    # The depth adapter: full width and heads in each kept layer.
    attn, mlp = adapter.base.layers[0].self_attn, adapter.base.layers[0].mlp
    return ((mlp.gate_proj.out_features, attn.q_proj.out_features // attn.head_dim),) * spec["depth"]


def best_within(points, key: str, limit: float):
    """The point of lowest dev loss (`loss`) whose cost `key` is within `limit`; None if none fits.
    The held-out loss never takes part in the choice."""
    # Costs compare at 3 decimals, as budgets do: depth 15 of 30 (0.5 + the final norm) is "half".
    fitting = [p for p in points if round(p.get(key, 2.0), 3) <= limit + 1e-9]
    return min(fitting, key=lambda p: p["loss"]) if fitting else None


def summarise(results) -> dict:
    """Per variant: the best dev loss within half the params, half the FLOPs, half the measured ms,
    with that same sub-network's held-out loss beside it."""
    def chosen(b, key):
        return None if b is None else {"spec": b["spec"], "loss": b["loss"], "holdout_loss": b.get("holdout_loss"),
                                       key: b[key]}
    return {name: {key: chosen(best_within(res["points"], key, 0.5), key) for key in ("params", "flops", "ms_rel")}
            for name, res in results.items()}


def measure_decoding(results, out: Path, args, device) -> dict:
    """Export the width run's best sub-network within half the params as a plain HF folder, reload it
    with transformers and time greedy decoding against the full model (and the half-depth SoFT one)."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    nested = open_checkpoint(results["width"]["run"])
    half = best_within([p for p in results["width"]["points"]], "params", 0.5)
    if half is None:
        return {}
    spec = dict(kv.split("=") for kv in half["spec"].split(","))
    sub = nested.sub_model(SubnetSpec({k: int(v) for k, v in spec.items()}))  # exit modules folded in
    sub.save_pretrained(out / "half-width")
    nested.tokenizer.save_pretrained(out / "half-width")
    models = {"full": AutoModelForCausalLM.from_pretrained(results["width"]["run"], dtype=dtype),
              "half-width": AutoModelForCausalLM.from_pretrained(out / "half-width", dtype=dtype)}
    if "depth" in results:
        depth_half = best_within(results["depth"]["points"], "params", 0.5)
        if depth_half is not None:
            dn = open_checkpoint(results["depth"]["run"])
            d = int(depth_half["spec"].split("=")[1])
            dn.sub_model(dn.space.validate({"depth": d})).save_pretrained(out / "half-depth")
            models["half-depth"] = AutoModelForCausalLM.from_pretrained(out / "half-depth", dtype=dtype)
    prompt = nested.tokenizer("Give three tips for staying healthy.", return_tensors="pt")["input_ids"]
    new_tokens, repeats = (4, 1) if args.smoke else (128, 2)
    speed = {"spec": half["spec"], "new_tokens": new_tokens, "dtype": str(dtype).removeprefix("torch.")}
    for batch in (1, 16):
        for name, model in models.items():  # side by side, same prompt, same process
            model.to(device).eval()
            speed[f"{name}/batch{batch}"] = decode_rate(model, prompt, batch, new_tokens, device, repeats)
            if device.type == "cuda":  # manyinone's runtime: static KV cache + CUDA graphs
                try:
                    speed[f"{name}/batch{batch}/runtime"] = runtime_rate(model, prompt, batch, new_tokens, repeats)
                except Exception as exc:  # report, do not lose the rest of the benchmark
                    speed[f"{name}/batch{batch}/runtime-error"] = f"{type(exc).__name__}: {exc}"[:200]
            model.to("cpu")
        speed[f"speedup/batch{batch}"] = speed[f"half-width/batch{batch}"] / speed[f"full/batch{batch}"]
        if f"half-width/batch{batch}/runtime" in speed and f"full/batch{batch}/runtime" in speed:
            speed[f"speedup/batch{batch}/runtime"] = speed[f"half-width/batch{batch}/runtime"] / speed[f"full/batch{batch}/runtime"]
    return speed


def runtime_rate(model, prompt_ids, batch: int, new_tokens: int, repeats: int) -> float:
    """Greedy tokens/s through manyinone.runtime.Runtime (CUDA graphs), no early stop."""
    from manyinone.runtime import Runtime

    rt = Runtime(model, None, None, max_len=prompt_ids.shape[1] + new_tokens + 16)
    prompts = [prompt_ids[0].tolist()] * batch
    rt.generate(prompts, None, new_tokens, stop_ids=set())  # warm-up: graph capture
    rates = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        rt.generate(prompts, None, new_tokens, stop_ids=set())
        torch.cuda.synchronize()
        rates.append(batch * new_tokens / (time.perf_counter() - start))
    return max(rates)


def write_markdown(out: Path, results, summary, speed, latency) -> None:
    lines = ["Best **dev** loss within half the full model's cost (chosen on dev); the same sub-network's "
             "**held-out** loss after the slash (never used to choose).", "",
             "| variant | ≤ 0.5 params: dev / held-out (spec) | ≤ 0.5 FLOPs | ≤ 0.5 measured ms | train s | steps |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, res in results.items():
        s = summary[name]
        lines.append(f"| {name} | {summary_cell(s['params'])} | {summary_cell(s['flops'])} | "
                     f"{summary_cell(s['ms_rel'])} | {res['train_s']:.0f} | {res.get('steps', '—')} |")
    lines.append("\ntrain s: wall clock of each training, loading and saving included (trainings side by side "
                 "under --jobs overlap); routed variants: their router's training on the width run.")
    for name, res in results.items():  # the signal each variant trained with, so a reader can check it is one
        if "config" in res:
            cfg = res["config"]
            unused = ({"teacher_weight", "teacher_full_weight"} if not cfg.get("teacher") else set()) \
                | ({"mix_ratio"} if not cfg.get("mix_data") else set())  # settings of what this run lacks
            lines.append(f"- {name}: " + ", ".join(f"{k}={cfg.get(k)}" for k in SIGNAL if k not in unused))
    lines += equal_cost_lines(results)
    for key, what in (("flops", "FLOP"), ("ms_rel", "measured millisecond")):
        ranked = sorted((s[key]["loss"], n) for n, s in summary.items() if s[key] is not None)
        if ranked:
            lines.append(f"\nAt half the {what}s, the best quality comes from **{ranked[0][1]}** (dev loss {ranked[0][0]:.3f}).")
    if latency:
        lines.append(f"\nLatency table: {latency['device']}, forward of [{latency['batch']}, {latency['seq']}] tokens, "
                     f"{latency['dtype']}; layer ms per (width, heads) and {latency['rest_ms']:.2f} ms outside the layers.")
    if speed:
        lines.append(f"\nDecoding ({speed['dtype']}, greedy, {speed['new_tokens']} new tokens, plain transformers generate), "
                     f"tokens/s: " + ", ".join(f"{k} {v:,.1f}" for k, v in speed.items()
                                               if "/" in k and "speedup" not in k and isinstance(v, float))
                     + f"; half-width ({speed['spec']}) speed-up {speed['speedup/batch1']:.2f}x at batch 1, "
                     f"{speed['speedup/batch16']:.2f}x at batch 16"
                     + "".join(f"; {k} {v:.2f}x" for k, v in speed.items() if k.startswith("speedup") and k.endswith("runtime"))
                     + "".join(f"; {k}: {v}" for k, v in speed.items() if k.endswith("error")) + ".")
    write_text_durably(out / "results.md", "\n".join(lines) + "\n")


def summary_cell(b) -> str:
    """`dev / held-out (spec)` of one chosen point, `—` where none fits."""
    if b is None:
        return "—"
    held = "—" if b.get("holdout_loss") is None else f"{b['holdout_loss']:.3f}"
    return f"{b['loss']:.3f} / {held} ({b['spec']})"


def equal_cost_lines(results) -> list[str]:
    """The issue's comparison: at average cost 0.5 and 0.7 (FLOPs), each variant's best dev loss, and
    the token router's width shares per layer (a router that always picks one width is static in disguise)."""
    names = [n for n in ("width", "routed", "adaptive", "token", "token-joint") if n in results]
    if "token" not in results:
        return []
    lines = ["\n| average cost ≤ | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for limit in (0.5, 0.7):
        cells = []
        for n in names:
            b = best_within(results[n]["points"], "flops", limit)
            cells.append("—" if b is None else f"{b['loss']:.3f} ({b['flops']:.3f})")
        lines.append(f"| {limit} | " + " | ".join(cells) + " |")
    for p in [p for n in ("token", "token-joint") if n in results for p in results[n]["points"]]:
        varying = sum(len([s for s in layer.values() if s >= 0.05]) > 1 for layer in p["widths_per_layer"])
        lines.append(f"\n{p['spec']}: dev loss {p['loss']:.3f} at average FLOPs {p['flops']:.3f}"
                     + (f", ms {p['ms']:.2f}" if "ms" in p else "") + f"; plan shares {p['usage']}; "
                     f"{varying} of {len(p['widths_per_layer'])} layers vary their width across tokens; "
                     f"router overhead {p['router_flops']:.2e} of the full model's FLOPs per token")
    return lines


def plot(path: Path, results) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_ms = all("ms_rel" in p for res in results.values() for p in res["points"])
    fig, axes = plt.subplots(1, 2 if has_ms else 1, figsize=(11 if has_ms else 6, 4), squeeze=False)
    for ax, key, label in zip(axes[0], ("flops", "ms_rel"), ("relative FLOPs per token", "relative measured latency")):
        for name, res in results.items():
            pts = sorted(res["points"], key=lambda p: p[key])
            frontier, best = [], float("inf")
            for p in pts:  # the variant's Pareto front: each point beats every cheaper one
                if p["loss"] < best:
                    frontier.append(p)
                    best = p["loss"]
            line = ax.plot([p[key] for p in frontier], [p["loss"] for p in frontier], marker="o", label=name)[0]
            ax.scatter([p[key] for p in pts], [p["loss"] for p in pts], s=8, alpha=0.3, color=line.get_color())
        ax.set_xlabel(label)
        ax.set_ylabel("dev loss (nats/token)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
