"""Training cost of SoFT vs SFT, side by side in one process: step time, peak memory, tokens/s, MFU.

Random weights at a named shape (or the config of an HF folder), random tokens, every position
supervised unless --supervised < 1. Variants (any subset, in order, via --variants):
    hf-sft      plain transformers SFT: model(input_ids, labels=...).loss (full logits)
    sft         manyinone, exits = [L] only
    soft        manyinone, --exits (default 5 evenly spaced), the configured loss (lean by default)
    soft-plain  as soft with loss_impl=plain (logits per exit, as before issue 6)
    soft-kd     as soft with self-distillation towards the full depth (distill_weight=1)
    lora-soft   as soft on a frozen base with LoRA adapters (peft, rank --lora-r, all linear layers)
    soft-8bit   as soft with torchao's AdamW8bit (bf16 weights: stochastic rounding)
Each variant: fresh fused AdamW (unless named otherwise), bf16 autocast on CUDA (as train.py), grad clip 1.0, --warmup
steps, then the median of --steps timed steps; peak = torch.cuda.max_memory_allocated for that
variant (weights + grads + optimizer + activations).

FLOPs per step (PaLM appendix B; causal attention counted in full):
    tokens * (6 * P_layers + 12 * L * d_attn * S) + head_tokens * 6 * P_head * n_exits
with 4 in place of 6 for frozen weights (LoRA's base, its LM head: forward and input gradient, no
weight gradient); activation checkpointing's recomputed forward is not counted (model FLOPs).
P_layers: Linear weights of the first L (= deepest exit) decoder layers; d_attn = heads * head_dim;
head_tokens: tokens whose logits are computed (all for hf-sft, supervised ones for manyinone);
n_exits: heads evaluated (1 for SFT, 5 for SoFT with 5 exits). MFU = FLOPs / step time / peak.

    python benchmarks/train_cost.py --smoke                      # tiny shape on CPU (seconds)
    python benchmarks/train_cost.py --shape smollm2 --batch 16 --seq 512
    python benchmarks/train_cost.py --shape 7b --batch 4 --seq 2048   # ~90 GiB for hf-sft: --batch 2 on 80 GiB
    torchrun --nproc-per-node 2 benchmarks/train_cost.py --shape 13b --batch 4 --seq 2048 --checkpointing \
        --variants sft,soft                                       # FSDP2 through manyinone.train.distributed
    python benchmarks/train_cost.py --suite one-gpu               # issue 15's table: 13B LoRA / 8-bit, 7B (one H200)
    python benchmarks/train_cost.py --suite one-gpu --smoke       # the same jobs at the tiny shape on CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import signal
import statistics
import time
from contextlib import nullcontext

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from manyinone.core.space import SubnetSpec, even_exits
from manyinone.train.distributed import Runtime
from manyinone.train.losses import nested_loss, supervised_positions
from manyinone.train.optim import make_optimizer
from manyinone.core.registry import adapter_for

SHAPES = {  # LLaMA layouts; random weights are enough for cost
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=False),
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False),
    "13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                num_attention_heads=40, num_key_value_heads=40, tie_word_embeddings=False),
}
VARIANTS = ("hf-sft", "sft", "soft", "soft-plain", "soft-kd", "lora-soft", "soft-8bit")


def model_config(shape: str, seq: int):
    if shape in SHAPES:
        return LlamaConfig(**SHAPES[shape], max_position_embeddings=max(seq, 2048), rms_norm_eps=1e-5)
    return AutoConfig.from_pretrained(shape)  # an HF folder: its config only


def step_flops(model: nn.Module, depth: int, tokens: int, head_tokens: int, n_heads: int, seq: int,
               as_trained: bool = True) -> float:
    """Model FLOPs of one step: 6 per weight that trains (forward, input and weight gradients), 4 per
    frozen one (no weight gradient). `as_trained=False`: the plain model (LoRA's adapters left out)
    with every weight trained, the SFT reference of "SFT-equiv MFU"."""
    layers = list(model.model.layers)[:depth]
    linears = [(n, m) for layer in layers for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
    if as_trained:
        per_token = sum((6 if m.weight.requires_grad else 4) * m.weight.numel() for _, m in linears)
    else:
        per_token = 6 * sum(m.weight.numel() for n, m in linears if "lora_" not in n)
    d_attn = layers[0].self_attn.q_proj.out_features
    head = model.lm_head.weight
    head_factor = 6 if head.requires_grad or not as_trained else 4
    return tokens * (per_token + 12 * depth * d_attn * seq) + head_tokens * head_factor * head.numel() * n_heads


def run_variant(name, model, adapter, exits, batch, device, args, rt: Runtime, optimizer_name: str = "adamw") -> dict:
    ids, labels = batch
    mask = torch.ones_like(ids)
    num_layers = len(model.model.layers)
    specs = [SubnetSpec(depth=d) for d in ([num_layers] if name in ("hf-sft", "sft") else exits)]
    loss_impl = "plain" if name == "soft-plain" else args.loss_impl
    distill = 1.0 if name == "soft-kd" else 0.0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    trained = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapters only
    optimizer = make_optimizer(optimizer_name, [{"params": trained}], 1e-6, 0.0, device)

    def step() -> None:
        if name == "hf-sft":
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        else:
            with autocast:
                hidden = adapter.forward_nested(ids, mask, specs)
                feats, targets = {}, None
                for spec, h in hidden.items():
                    feats[spec], targets = supervised_positions(h, labels)
                head = (loss_impl == "lean" and adapter.linear_head()) or adapter.exit_logits
                loss = nested_loss(feats, head, targets, {}, teacher=specs[-1], distill_weight=distill).total
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(args.warmup + args.steps):
        rt.barrier()
        sync()
        started = time.perf_counter()
        step()
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    del optimizer
    model.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    seconds = statistics.median(times)
    tokens = ids.numel()
    supervised = int((labels[:, 1:] != -100).sum())
    head_tokens = tokens if name == "hf-sft" else supervised
    flops = step_flops(model, specs[-1]["depth"], tokens, head_tokens, len(specs), ids.shape[1])
    flops_sft = step_flops(model, num_layers, tokens, tokens, 1, ids.shape[1], as_trained=False)
    return {"variant": name, "exits": [s["depth"] for s in specs], "loss_impl": loss_impl if name != "hf-sft" else "hf",
            "optimizer": optimizer_name, "trained_params": sum(p.numel() for p in trained),
            "batch": ids.shape[0], "seq": ids.shape[1],
            "step_s": seconds, "peak_gib": peak, "tokens_per_s_per_gpu": tokens / seconds,
            "tokens_per_s": tokens * rt.world / seconds, "tflop_per_step": flops / 1e12,
            "mfu": flops / seconds / (args.peak_tflops * 1e12), "sft_equiv_mfu": flops_sft / seconds / (args.peak_tflops * 1e12)}


def table(rows: list[dict], ref: str, world: int) -> str:
    base = next((r for r in rows if r["variant"] == ref), rows[0])
    lines = [f"| variant | exits | step ms | vs {base['variant']} | peak GiB/GPU | vs {base['variant']} | "
             f"tokens/s ({world} GPU) | TFLOP/step/GPU | MFU | SFT-equiv MFU |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(
            f"| {r['variant']} ({r['loss_impl']}) | {','.join(map(str, r['exits']))} | {r['step_s'] * 1e3:.1f} | "
            f"{r['step_s'] / base['step_s']:.3f}x | {r['peak_gib']:.2f} | {r['peak_gib'] / base['peak_gib']:.3f}x | "
            f"{r['tokens_per_s']:,.0f} | {r['tflop_per_step']:.1f} | {100 * r['mfu']:.1f}% | {100 * r['sft_equiv_mfu']:.1f}% |")
    return "\n".join(lines)


def run_named(name, model, exits, batch, device, args, rt: Runtime, optimizer: str | None = None) -> dict:
    """`run_variant` with what the variant needs around it: LoRA adapters put on and taken off again
    (the base weights are untouched), torchao's AdamW8bit for soft-8bit."""
    optimizer = optimizer or ("adamw8bit" if name == "soft-8bit" else "adamw")
    if name != "lora-soft":
        return run_variant(name, model, adapter_for(model), exits, batch, device, args, rt, optimizer)
    from manyinone.train import lora
    from manyinone.train.config import LoraSettings

    tuned = lora.apply_lora(model, LoraSettings(r=args.lora_r))  # freezes the base; adapters float32
    try:  # (non-reentrant checkpointing needs no input that requires grad, unlike peft's reentrant recipe)
        return run_variant(name, model, adapter_for(model), exits, batch, device, args, rt, optimizer)
    finally:
        tuned.unload()  # drop the adapters without merging: the next variant gets the plain model
        model.requires_grad_(True)


# --- issue 15's one-GPU table: (shape, variant, batch, exits as fractions of the depth, checkpointing, target)
SUITE = [  # 7B first: it is quick, and a run cut short by a timeout still has it
    ("7b", "soft", 4, None, False, "MFU >= 45%"),
    ("13b", "lora-soft", 1, (0.25, 0.5, 0.75, 1.0), False, "peak < 60 GiB, MFU >= 35%"),
    ("13b", "lora-soft", 2, (0.25, 0.5, 0.75, 1.0), False, "peak < 60 GiB, MFU >= 35%"),
    ("13b", "lora-soft", 4, (0.25, 0.5, 0.75, 1.0), True, "peak < 60 GiB, MFU >= 35%"),
    ("13b", "soft-8bit", 4, (0.25, 0.5, 0.75, 1.0), True, "fits < 135 GiB; step time, MFU"),
]


def run_suite(args, rt: Runtime, device: torch.device) -> list[dict]:
    """Each shape built once (random bf16 weights on the GPU), its jobs run in turn; a job that fails
    (out of memory) becomes a row saying so and the others still run; SIGTERM (a timeout) or Ctrl-C
    ends the suite with the rows finished so far."""
    rows: list[dict] = []

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        _suite_jobs(args, rt, device, rows)
    except KeyboardInterrupt:
        print(f"interrupted after {len(rows)} of {len(SUITE)} jobs", flush=True)
    return rows


def _suite_jobs(args, rt: Runtime, device: torch.device, rows: list[dict]) -> None:
    for shape in dict.fromkeys(job[0] for job in SUITE):
        built = "tiny" if args.smoke else shape
        torch.manual_seed(0)
        config = model_config(built, args.seq)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if device.type == "cuda"
                                                     else torch.float32, attn_implementation="sdpa")
        model.train()
        layers = config.num_hidden_layers
        for _, name, batch_size, fractions, checkpointing, target in (j for j in SUITE if j[0] == shape):
            exits = sorted({max(1, round(f * layers)) for f in fractions}) if fractions else list(even_exits(layers))
            g = torch.Generator().manual_seed(1)
            ids = torch.randint(0, config.vocab_size, (batch_size, args.seq), generator=g).to(device)  # [batch, seq]
            optimizer = "adamw8bit" if name == "soft-8bit" else "adamw"
            if optimizer == "adamw8bit" and device.type == "cpu" and not args.smoke_8bit:
                optimizer = "adamw"  # the CPU smoke run skips torchao's slow first compile
            if checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            label = {"shape": shape, "built": built, "checkpointing": checkpointing, "target": target}
            try:
                row = run_named(name, model, exits, (ids, ids.clone()), device, args, rt, optimizer)
            except Exception as exc:  # noqa: BLE001 - out of memory, or torchao missing: a row, not a crash
                row = {"variant": name, "exits": exits, "optimizer": optimizer, "batch": batch_size, "seq": args.seq,
                       "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"}
                model.zero_grad(set_to_none=True)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            finally:
                if checkpointing:
                    model.gradient_checkpointing_disable()
            rows.append({**label, **row})
            print(json.dumps(rows[-1]), flush=True)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def suite_table(rows: list[dict]) -> str:
    lines = ["| shape | variant | optimizer | act. ckpt | batch x seq | exits | trained params | step ms | peak GiB | "
             "tokens/s | MFU (own FLOPs) | target |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        shape = r["shape"] if r["built"] == r["shape"] else f"{r['shape']} (as {r['built']})"
        head = (f"| {shape} | {r['variant']} | {r['optimizer']} | {'yes' if r['checkpointing'] else 'no'} | "
                f"{r['batch']} x {r['seq']} | {','.join(map(str, r['exits']))} |")
        if "error" in r:
            lines.append(f"{head} - | failed: {r['error']} | - | - | - | {r['target']} |")
            continue
        lines.append(f"{head} {r['trained_params'] / 1e6:,.1f}M | {r['step_s'] * 1e3:.0f} | {r['peak_gib']:.1f} | "
                     f"{r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% | {r['target']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="smollm2", help=f"{', '.join(SHAPES)} or an HF model folder (config only)")
    parser.add_argument("--batch", type=int, default=16, help="sequences per GPU per step")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--exits", default=None, help="comma-separated depths; default 5 evenly spaced")
    parser.add_argument("--variants", default="hf-sft,sft,soft", help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--ref", default="sft", help="variant the ratios are taken against")
    parser.add_argument("--loss-impl", default="lean", choices=["lean", "plain"])
    parser.add_argument("--supervised", type=float, default=1.0, help="fraction of each sequence with labels (its tail)")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing of decoder layers")
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="weights; default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100/H200 SXM: 989)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--smoke", action="store_true", help="tiny shape on CPU, 1+2 steps")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank of lora-soft (all linear layers)")
    parser.add_argument("--suite", default=None, choices=["one-gpu"],
                        help="one-gpu: issue 15's table on one GPU (13B LoRA / 8-bit AdamW, 7B), seq 2048")
    parser.add_argument("--smoke-8bit", action="store_true", help="with --smoke: run torchao's AdamW8bit on CPU "
                                                                  "too (its first step compiles for minutes)")
    args = parser.parse_args()
    if args.suite and args.smoke:
        args.seq, args.warmup, args.steps = 64, 1, 2
    elif args.suite:
        args.seq, args.warmup, args.steps = 2048, 2, 5
    elif args.smoke:
        args.shape, args.batch, args.seq, args.warmup, args.steps = "tiny", 2, 64, 1, 2
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; allowed {list(VARIANTS)}")

    rt = Runtime.from_env()
    device = rt.device("cpu" if args.smoke else "auto") if rt.distributed else torch.device(
        "cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if args.suite:
        if rt.distributed:
            parser.error("--suite one-gpu runs on one GPU; start it without torchrun")
        started = time.perf_counter()
        rows = run_suite(args, rt, device)
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        weights = "bf16" if device.type == "cuda" else "float32"
        print(f"\none-GPU suite on {gpu}: random {weights} weights, seq {args.seq}, every position supervised, "
              f"lean loss, LoRA r={args.lora_r} on all linear layers, median of {args.steps} steps after "
              f"{args.warmup} warm-up; MFU = model FLOPs (frozen weights 4/param/token, trained 6, no recompute) "
              f"/ step time / {args.peak_tflops:g} TFLOP/s; {time.perf_counter() - started:.0f} s in all")
        print(suite_table(rows))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "device": gpu, "rows": rows}, f, indent=2)
        return
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype) or (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(0)
    config = model_config(args.shape, args.seq)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    if rt.distributed:
        rt.shard(model)
    model.train()
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    adapter = adapter_for(model)
    exits = [int(x) for x in args.exits.split(",")] if args.exits else list(even_exits(config.num_hidden_layers))

    g = torch.Generator().manual_seed(1 + rt.rank)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=g).to(device)  # [batch, seq]
    labels = ids.clone()
    labels[:, : int(round(args.seq * (1 - args.supervised)))] = -100  # the prompt part carries no loss

    rows = []
    for name in variants:
        rows.append(run_named(name, model, exits, (ids, labels), device, args, rt))
        if rt.is_main:
            print(json.dumps(rows[-1]), flush=True)
    if rt.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(f"\n{args.shape}: {n_params / 1e9:.2f}B params, {dtype}, batch {args.batch}x{args.seq} per GPU, "
              f"{rt.world} x {gpu}, supervised {args.supervised:.0%}, checkpointing {args.checkpointing}, "
              f"torch {torch.__version__}")
        print(table(rows, args.ref, rt.world))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "world": rt.world, "device": gpu, "rows": rows}, f, indent=2)
    rt.close()


if __name__ == "__main__":
    main()
