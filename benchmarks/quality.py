"""Train recipes from the same start through `manyinone train`, evaluate every exit, tabulate.

One command on the GPU machine (the SmolLM2 + Alpaca setting of ../shared/assets/README.md):
    python benchmarks/quality.py --model /root/smollm2-hf --data ../shared/assets/data/alpaca_2000.json \
        --recipes base,sft,sft-heads,soft,manyinone --jobs 4 --out runs/quality \
        --text ../shared/assets/data/wikitext2_raw_test.txt --qa ../shared/assets/data/triviaqa_1k.jsonl
Writes <out>/results.json, <out>/results.md (tables) and <out>/quality.png (relative cost vs
held-out loss, one line per recipe). Results are rewritten as each recipe finishes, so a run cut
short still leaves every finished recipe's numbers; `--resume` keeps them and runs only the rest
(a recipe's training resumes from its last saved step).

Two evaluation slices: dev (--eval-rows, what sweeps may look at) and held-out (--holdout-rows,
never used to choose anything); the tables give both and their token-weighted union.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

EXITS = "6,12,18,24,30"
# manyinone's recipe (docs/results.md says what each part contributes): tuned-lens style translators
# at each exit with their own 10x learning rate, self-distillation from the full depth, the full
# depth weighted 3x, lr 3e-4 with warm-up, 4 epochs.
MANYINONE = ["--exits", EXITS, "--epochs", "4", "--lr", "3e-4", "--set", "warmup_steps=20",
             "--set", "distill_weight=1", "--set", "exit_weights=[1,1,1,1,3]",
             "--set", "exit_heads=translator", "--set", "exit_heads_lr_scale=10"]
# The same with the base weights at lr 1e-4 and the translators at 30x: the full depth and exit 24
# come out better (1.852 / 2.384 vs 2.113 / 2.526), exits 6-18 slightly worse (docs/results.md).
MANYINONE_GENTLE = ["--exits", EXITS, "--epochs", "4", "--lr", "1e-4",
                    "--set", "distill_weight=1", "--set", "exit_weights=[1,1,1,1,3]",
                    "--set", "exit_heads=translator", "--set", "exit_heads_lr_scale=30"]
# Each recipe is a set of `manyinone train` flags on top of the common ones (they come last, so
# they win); "@name" as --model means "the checkpoint recipe `name` wrote" (that recipe runs first).
# The recipe for agreement with the full depth (issue 19): the gentle recipe plus a frozen teacher
# (the SFT run) that every exit and the full depth distil from, on labels mixed half and half
# with responses the teacher sampled itself (the `gen` data step). 2 epochs of the doubled data
# are as many steps as the gentle recipe's 4.
AGREE = [*MANYINONE_GENTLE[:2], "--epochs", "2", *MANYINONE_GENTLE[4:], "--set", "teacher=@sft",
         "--set", "mix_data=@gen", "--set", "mix_ratio=0.5"]
LR3 = ["--lr", "3e-4", "--set", "warmup_steps=20", "--set", "exit_heads_lr_scale=10"]
AGREE_BIG = [*AGREE[:-4], "--set", "mix_data=@gen6", "--set", "mix_ratio=0.75"]
G16_AS_GEN6 = ["--set", "mix_data=@gen16", "--set", "mix_rows=0:10800", "--set", "mix_ratio=0.75"]
# The full depth leans on the teacher (KL x3) instead of labels x3.
FULL_BY_TEACHER = ["--set", "teacher_full_weight=3", "--set", "exit_weights=[1,1,1,1,1]"]
# Round 5's best: from the SFT run, one epoch of which 90% is the teacher's samples (gen16 by default);
# `--recipe agree` is this with exit layers (round 8).
def agree_xl(data: str = "gen16") -> list[str]:
    return ["--model", "@sft", *AGREE[:-4], "--epochs", "1", "--set", f"mix_data=@{data}", "--set", "mix_ratio=0.9",
            *LR3, *FULL_BY_TEACHER]


AGREE_XL = agree_xl()
ON_POLICY = ["--set", "on_policy_ratio=0.25", "--set", "on_policy_tokens=64"]
RECIPES: dict[str, list[str]] = {
    "sft": ["--exits", "30"],
    # SFT + early-exit heads (the Sorted-LLaMA paper's SFT+ICT): own norm + LM head per exit,
    # initialised from the final ones and trained on the frozen SFT model.
    "sft-heads": ["--model", "@sft", "--exits", EXITS, "--lr", "3e-4", "--set", "warmup_steps=20",
                  "--set", "exit_heads=head", "--set", "freeze_base=true"],
    "soft": ["--exits", EXITS],
    "soft-kd": ["--exits", EXITS, "--set", "distill_weight=1.0"],
    "manyinone": MANYINONE,
    "manyinone-gentle": MANYINONE_GENTLE,
    "agree": AGREE,
    "agree-reverse": [*AGREE, "--set", "teacher_kl=reverse"],
    "agree-nomix": [*MANYINONE_GENTLE, "--set", "teacher=@sft"],  # the teacher alone, labels only
    "gentle-mix": [*AGREE[:-6], "--set", "mix_data=@gen", "--set", "mix_ratio=0.5"],  # the data alone
    # More generated data (gen6: 6 samples per prompt, ~4-5x the labelled tokens), 75% of each epoch
    # drawn from it: 2 epochs are 900 steps and see every generated record once.
    "agree-big": AGREE_BIG,
    # Levers on top of agree-big, one each (issue 19, item 4):
    "agree-big-lr3": [*AGREE_BIG, *LR3],  # faster base lr, the full depth held by the teacher
    "agree-big-seg": [*AGREE_BIG, "--set", "segment_lr_scales=[4,3,2,1,1]"],  # early layers train faster
    "agree-big-drop": [*AGREE_BIG, "--set", "layer_dropout=0.1"],  # LayerSkip's layer dropout
    "agree-big-full": [*AGREE_BIG, *FULL_BY_TEACHER],
    # Round 3 candidates (not run yet): the best exits (lr3) with the full depth held by the teacher,
    # and GKD-style on-policy rows (a quarter of each micro-batch sampled by the model being trained).
    "agree-lr3-full": [*AGREE_BIG, *LR3, *FULL_BY_TEACHER],
    "agree-lr3-onpolicy": [*AGREE_BIG, *LR3, "--set", "on_policy_ratio=0.25", "--set", "on_policy_tokens=128"],
    # agree-lr3-full with raw-text continuations as its generated data (against the WikiText regression).
    "agree-lr3-text": [*AGREE[:-4], "--set", "mix_data=@gentext", "--set", "mix_ratio=0.5", *LR3, *FULL_BY_TEACHER],
    # agree-lr3-full on gen16 with 90% of each epoch generated (2 epochs: 2,250 steps, 2.5x agree-big).
    "agree-huge": [*AGREE[:-4], "--set", "mix_data=@gen16", "--set", "mix_ratio=0.9", *LR3, *FULL_BY_TEACHER],
    # Round 3: start from the SFT run (the teacher itself) instead of the base model, so the full depth
    # begins at SFT's loss and the teacher's KL only has to hold it there while the exits learn.
    "agree-init": ["--model", "@sft", *AGREE_BIG, *FULL_BY_TEACHER],
    "agree-init-lr3": ["--model", "@sft", *AGREE_BIG, *LR3, *FULL_BY_TEACHER],
    "agree-init-lr3-labels": ["--model", "@sft", *AGREE_BIG, *LR3],  # the full depth on labels x3, as in agree-big-lr3
    # Round 4 candidates (not run yet): levers aimed at agreement itself, on agree-big-lr3 (`--recipe agree`).
    "agree-lr3-reverse": [*AGREE_BIG, *LR3, "--set", "teacher_kl=reverse"],  # mode-seeking: round 1's best agreement
    "agree-lr3-selfkd3": [*AGREE_BIG, *LR3, "--set", "distill_weight=3"],  # the exits lean on the model's own full depth
    "agree-lr3-pos": [*AGREE_BIG, *LR3, "--set", "exit_positions=0.5"],  # exits on half the positions: cost lever
    # Round 4 (session 2026-12-02 b): one lever each on round 3's best (agree-init-lr3).
    "agree-sharp": ["--model", "@sft", *AGREE_BIG, *LR3, *FULL_BY_TEACHER, "--set", "teacher_temperature=0.5"],
    "agree-init-reverse": ["--model", "@sft", *AGREE_BIG, *LR3, *FULL_BY_TEACHER, "--set", "teacher_kl=reverse"],
    # 16 samples per prompt, 90% of each epoch generated: one epoch is 1,125 steps (1.25x) over 2.7x the records.
    "agree-xl": AGREE_XL,
    # Round 5 candidates (not run yet), all on gen16 so that one data step feeds every row: its first
    # 10,800 records are 6 samples of each prompt (distill-data writes sample-major), i.e. gen6's draw.
    "agree-g16": ["--model", "@sft", *AGREE_BIG[:-4], *G16_AS_GEN6, *LR3, *FULL_BY_TEACHER],  # the reference
    # Own norm + LM head per exit (kind "head"), trained with the body: 28M more parameters per exit
    # on SmolLM2 where a translator has 0.3M, the capacity lever the objective-side levers lacked.
    "agree-heads": ["--model", "@sft", *AGREE_BIG[:-4], *G16_AS_GEN6, *LR3, *FULL_BY_TEACHER,
                    "--set", "exit_heads=head", "--set", "exit_heads_lr_scale=1"],
    # Own feed-forward block per exit (h + mlp(norm(h)) before the translator, copied from the next
    # layer, zero output at the start; 2.7M parameters per exit on SmolLM2): capacity that, unlike
    # own heads, also works on the exit's features and exports as one more plain decoder layer.
    "agree-block": ["--model", "@sft", *AGREE_BIG[:-4], *G16_AS_GEN6, *LR3, *FULL_BY_TEACHER,
                    "--set", "exit_heads=block"],
    # Round 6 candidates (not run yet): round 5's two gains together (all of gen16, exit blocks),
    # and the same over two epochs of gen16 (2,250 steps: does more of the same data still pay?).
    "agree-xl-block": [*AGREE_XL, "--set", "exit_heads=block"],
    "agree-xl2-block": ["--model", "@sft", *AGREE[:-4], "--epochs", "2", "--set", "mix_data=@gen16",
                        "--set", "mix_ratio=0.9", *LR3, *FULL_BY_TEACHER, "--set", "exit_heads=block"],
    # GKD-style on-policy rows on agree-xl (issue 19 item 3, never measured on the GPU): a quarter of
    # each micro-batch is continuations the full depth being trained samples itself, scored against
    # the teacher: the tokens that agreement and speculative acceptance are measured on. Each step
    # samples up to 64 tokens for those rows before its forward (its cost is on_policy_s in metrics).
    "agree-xl-onpolicy": [*AGREE_XL, *ON_POLICY],
    # The same rows sampled cool: agreement is scored on the full depth's greedy continuations, and
    # temperature 1 spends the on-policy rows on text that greedy decoding never reaches.
    "agree-xl-onpolicy-cool": [*AGREE_XL, *ON_POLICY, "--set", "on_policy_temperature=0.3"],
    # Round 7: the full depth's anchor to the teacher at 10x instead of 3x (its share of the gradient
    # against the four exits'), the lever aimed at the full depth's 0.07-nat and WikiText regression.
    "agree-xl-full10": [*AGREE_XL, "--set", "teacher_full_weight=10"],
    # Round 8 candidates (not run yet): round 7's two gains together (exit blocks for the exits, the
    # full depth at 10x for itself and WikiText), and on-policy rows sampled cool on top of them.
    "agree-xl-block-full10": [*AGREE_XL, "--set", "exit_heads=block", "--set", "teacher_full_weight=10"],
    # Kangaroo's exit adapter itself: a whole decoder layer (attention + MLP) per exit instead of the block's
    # MLP alone; in the runtime each exit layer has a KV cache of its own.
    "agree-xl-layer": [*AGREE_XL, "--set", "exit_heads=layer"],
    "agree-xl-layer-full10": [*AGREE_XL, "--set", "exit_heads=layer", "--set", "teacher_full_weight=10"],
    # Kangaroo's own setting: the SFT body frozen, so the full depth and WikiText stay the SFT run's
    # exactly, and agreement comes from the exit layers alone. Where round 8 finds it, on that axis.
    "agree-xl-layer-frozen": [*AGREE_XL, "--set", "exit_heads=layer", "--set", "freeze_base=true"],
    "agree-xl-block-full30": [*AGREE_XL, "--set", "exit_heads=block", "--set", "teacher_full_weight=30"],
    "agree-xl-block-full10-cool": [*AGREE_XL, "--set", "exit_heads=block", "--set", "teacher_full_weight=10",
                                   *ON_POLICY, "--set", "on_policy_temperature=0.3"],
    # Round 9 candidates (not run yet), on round 8's best (exit layers). Agreement is scored on the full
    # depth's greedy continuations, and gen16 samples at temperature 0.8: text that greedy decoding rarely
    # writes. Two ways to put the exits on the greedy path: the teacher's samples drawn cooler (gen16t5),
    # and GKD-style on-policy rows sampled cool (on-policy was cut short twice and never measured).
    "agree-xl-layer-t5": [*agree_xl("gen16t5"), "--set", "exit_heads=layer"],
    "agree-xl-layer-onpolicy-cool": [*AGREE_XL, "--set", "exit_heads=layer", *ON_POLICY,
                                     "--set", "on_policy_temperature=0.3"],
    # Agreement is counted against the trained full depth, not the teacher: the exits' self-distillation
    # from the full depth at 3x (with the teacher's KL unchanged) pulls them towards what is scored.
    "agree-xl-layer-selfkd3": [*AGREE_XL, "--set", "exit_heads=layer", "--set", "distill_weight=3"],
    # Twice the samples (gen32, ~4 GPU-minutes with the grouped-attention sampler), 94.7% of an epoch:
    # 32,400 generated rows an epoch (about half of gen32) and ~2,140 steps, as many draws as
    # agree-xl2-layer's two epochs over gen16, which repeat records instead. Round 5's 2.7x the records
    # bought +0.02 agreement.
    "agree-xl-layer-g32": [*agree_xl("gen32"), "--set", "mix_ratio=0.9474", "--set", "exit_heads=layer"],
    # Two epochs over gen16 (2,250 steps): does more of the same data still pay with exit layers?
    "agree-xl2-layer": [*AGREE_XL, "--epochs", "2", "--set", "exit_heads=layer"],
    # Exit losses on half the positions: the exits' LM-head work is about half of a step's FLOPs.
    "agree-pos": ["--model", "@sft", *AGREE_BIG[:-4], *G16_AS_GEN6, *LR3, *FULL_BY_TEACHER,
                  "--set", "exit_positions=0.5"],
    # LoRA-nested SoFT (issue 15): plain SoFT's recipe on a frozen base with adapters on every linear
    # layer, shared by all exits, at 10x the learning rate (the usual LoRA rule); compare each with
    # "soft" per exit, and the ranks with one another for the rank that closes the gap.
    **{f"soft-lora{r}": ["--exits", EXITS, "--lora", str(r), "--lr", "5e-4"] for r in (8, 32, 128)},
    # The gentle recipe with adapters: body at 10x, translators at the gentle recipe's own 3e-3.
    "gentle-lora64": [*MANYINONE_GENTLE[:4], "--lr", "1e-3", *MANYINONE_GENTLE[6:-2],
                      "--set", "exit_heads_lr_scale=3", "--lora", "64"],
}
PREFIX_TEXT = "{prefix_text}"  # filled in from --prefix-text
# Data steps: `manyinone distill-data` runs; "@name" in a recipe's flags is the JSONL they write.
DATA_STEPS: dict[str, list[str]] = {
    "gen": ["--teacher", "@sft", "--samples", "4", "--temperature", "0.8", "--top-p", "0.95",
            "--max-new-tokens", "256", "--batch-size", "256"],
    # Round 3: 16 samples per prompt (~12x the labelled tokens); run it alone on the GPU first.
    "gen16": ["--teacher", "@sft", "--samples", "16", "--temperature", "0.8", "--top-p", "0.95",
              "--max-new-tokens", "256", "--batch-size", "1024"],
    # Continuations of raw-text prefixes (--prefix-text, e.g. TinyStories; never WikiText, the test
    # set): general text against the full depth's WikiText regression.
    "gentext": ["--teacher", "@sft", "--text", PREFIX_TEXT, "--prefixes", "4000", "--prefix-tokens", "64",
                "--samples", "1", "--max-new-tokens", "192", "--batch-size", "1024"],
    # Twice gen16's samples per prompt, for agree-xl-layer-g32.
    "gen32": ["--teacher", "@sft", "--samples", "32", "--temperature", "0.8", "--top-p", "0.95",
              "--max-new-tokens", "256", "--batch-size", "1024"],
    # gen16 drawn cooler (round 9): closer to the greedy text that agreement is scored on.
    "gen16t5": ["--teacher", "@sft", "--samples", "16", "--temperature", "0.5", "--top-p", "0.95",
                "--max-new-tokens", "256", "--batch-size", "1024"],
    "gen6": ["--teacher", "@sft", "--samples", "6", "--temperature", "0.8", "--top-p", "0.95",
             "--max-new-tokens", "256", "--batch-size", "512"],
}


def needs(flags: list[str]) -> list[str]:
    """Recipes or data steps a recipe's flags refer to as @name (a whole flag or after `key=`)."""
    return [flag.split("@", 1)[1] for flag in flags if flag.startswith("@") or "=@" in flag]


def substitute(flags: list[str], paths: dict[str, str]) -> list[str]:
    out = []
    for flag in flags:
        if flag.startswith("@") or "=@" in flag:
            head, name = flag.split("@", 1)
            flag = head + paths[name]
        out.append(flag)
    return out


def run(cmd: list[str], log: Path | None = None) -> None:
    print("+", " ".join(cmd), flush=True)
    if log is None:
        subprocess.run(cmd, check=True)
        return
    with log.open("w") as f:  # concurrent jobs each get their own log instead of interleaved output
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(f"{cmd[3]} failed (exit {done.returncode}); see {log}:\n" + log.read_text()[-2000:])


def train_metrics(run_dir: Path) -> dict[str, float]:
    from manyinone.train.state import read_metrics

    rows = read_metrics(run_dir)
    steady = rows[5:] or rows  # the first steps include allocator and kernel warm-up
    out = {"step_time_s": statistics.median(r["step_time_s"] for r in steady),
           "train_s": sum(r["step_time_s"] for r in rows),  # every step, across resumes: the GPU time of training
           "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady), "steps": len(rows)}
    if "peak_mem_gib" in rows[-1]:
        out["peak_mem_gib"] = max(r["peak_mem_gib"] for r in rows)
    return out


def tables(results: dict[str, dict]) -> str:
    exits = [int(e) for e in EXITS.split(",")]
    head = " | ".join(f"exit {e}" for e in exits)
    rule = " | ".join("---" for _ in exits)

    def per_exit(title: str, key: str, fmt: str, extra=None) -> list[str]:
        lines = [f"**{title}**", "", f"| recipe | {head} |" + (" step time | tokens/s | peak memory |" if extra else ""),
                 f"| --- | {rule} |" + (" --- | --- | --- |" if extra else "")]
        for recipe, res in results.items():
            values = {r["depth"]: r.get(key) for r in res["exits"]}
            if all(v is None for v in values.values()):
                continue
            cells = " | ".join("—" if values.get(e) is None else format(values[e], fmt) for e in exits)
            lines.append(f"| {recipe} | {cells} |" + (extra(res) if extra else ""))
        return lines + [""]

    def train_cells(res: dict) -> str:
        t = res.get("train")
        if not t:
            return " — | — | — |"
        return f" {t['step_time_s']:.3f} s | {t['tokens_per_s']:,.0f} | {t.get('peak_mem_gib', float('nan')):.2f} GiB |"

    lines = per_exit("Loss per response token, dev + held-out (Alpaca 1800-1999, lower is better)", "loss", ".3f",
                     train_cells)
    lines += per_exit("Loss, dev slice only", "dev_loss", ".3f")
    lines += per_exit("Loss, held-out slice only (never used to choose)", "holdout_loss", ".3f")
    lines += per_exit("Agreement on generations (full depth's greedy 128 tokens), dev + held-out", "gen_agreement", ".3f")
    lines += per_exit("Agreement on generations, dev slice only", "dev_gen_agreement", ".3f")
    lines += per_exit("Agreement on generations, held-out slice only", "holdout_gen_agreement", ".3f")
    lines += per_exit("KL(full || exit) on those generations", "gen_kl", ".3f")
    lines += per_exit("The full depth's token among the exit's 2 most probable, on those generations", "gen_top2", ".3f")
    lines += per_exit("... among the exit's 4 most probable", "gen_top4", ".3f")
    lines += per_exit("Perplexity on WikiText-2 test (lower is better)", "text_ppl", ".1f")
    lines += per_exit("Top-1 agreement with the same model's full depth (teacher forcing on references)",
                      "top1_agreement", ".3f")
    lines += per_exit("TriviaQA exact match, closed book, greedy (higher is better)", "qa_em", ".3f")
    lines += per_exit("TriviaQA: an answer alias appears in the answer (lenient)", "qa_contains", ".3f")
    lines += ["**Cost (GPU-minutes, wall clock of each step's own commands; recipes ran side by side on one GPU)**", "",
              "| recipe | own train | own eval | with what it builds on (teacher, data) |", "| --- | --- | --- | --- |"]
    for recipe, res in results.items():
        c = res.get("cost")
        if c:
            lines.append(f"| {recipe} | {c.get('train_s', 0) / 60:.1f} | {c.get('eval_s', 0) / 60:.1f} | "
                         f"{c.get('total_s', 0) / 60:.1f} |")
    return "\n".join(lines)


def data_table(data: dict[str, dict]) -> str:
    if not data:
        return ""
    lines = ["", "**Generated data (GPU-minutes include the teacher's own training)**", "",
             "| data step | records | GPU-minutes |", "| --- | --- | --- |"]
    for name, d in data.items():
        timed = d["seconds"] == d["seconds"]  # NaN: finished by an earlier call that recorded no cost
        lines.append(f"| {name} | {d['records']:,} | {d['seconds'] / 60:.1f} |" if timed else
                     f"| {name} | {d['records']:,} | not timed (finished by an earlier call) |")
    return "\n".join(lines)


def merge_slices(dev: list[dict], holdout: list[dict]) -> list[dict]:
    """Per exit: the dev row, plus held-out figures and their token-weighted union over both slices."""
    merged = []
    for d, h in zip(dev, holdout):
        row = dict(d)
        for key in ("loss", "top1_agreement", "top1_accuracy", "kl_to_full"):
            row[f"dev_{key}"], row[f"holdout_{key}"] = d[key], h[key]
            row[key] = (d[key] * d["tokens"] + h[key] * h["tokens"]) / (d["tokens"] + h["tokens"])
        if "gen_agreement" in d:
            for key in ("gen_agreement", "gen_kl", "gen_top2", "gen_top4"):
                if key not in d:  # an eval.json written before the key existed
                    continue
                row[f"dev_{key}"], row[f"holdout_{key}"] = d[key], h[key]
                row[key] = (d[key] * d["gen_tokens"] + h[key] * h["gen_tokens"]) / (d["gen_tokens"] + h["gen_tokens"])
        merged.append(row)
    return merged


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for recipe, res in results.items():
        ax.plot([r["relative_cost"] for r in res["exits"]], [r["loss"] for r in res["exits"]], marker="o", label=recipe)
    ax.set_xlabel("relative cost (FLOPs per token)")
    ax.set_ylabel("held-out loss (Alpaca 1800-1999)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--train-rows", default="0:1800")
    parser.add_argument("--eval-rows", default="1800:1900", help="dev slice")
    parser.add_argument("--holdout-rows", default="1900:2000", help="held-out slice, never used to choose")
    parser.add_argument("--gen-prompts", type=int, default=64, help="prompts per slice for agreement on generations")
    parser.add_argument("--save-every", type=int, default=100, help="training steps between resumable states")
    parser.add_argument("--resume", action="store_true", help="keep <out>/results.json and run only what is missing")
    parser.add_argument("--recipes", default="base,sft,soft", help=f"comma-separated: base and {sorted(RECIPES)}")
    parser.add_argument("--recipe", action="append", default=[], metavar="NAME=FLAGS",
                        help="an extra recipe: `manyinone train` flags, e.g. 'soft-hi=--exits 6,30 --lr 1e-4'")
    parser.add_argument("--jobs", type=int, default=1, help="recipes trained at once (one GPU holds several)")
    parser.add_argument("--out", default="runs/quality")
    parser.add_argument("--epochs", default="2")
    parser.add_argument("--batch-size", default="16")
    parser.add_argument("--lr", default="5e-5")
    parser.add_argument("--template", default="alpaca")
    parser.add_argument("--prefix-text", help="raw text whose prefixes the gentext data step continues")
    parser.add_argument("--compile", action="store_true", help="every training compiles its decoder layers "
                                                               "(`--set compile_layers=true`)")
    parser.add_argument("--text", help="raw text for per-exit perplexity (WikiText-2 test)")
    parser.add_argument("--qa", help="QA .jsonl for per-exit exact match (TriviaQA 1k)")
    parser.add_argument("--qa-limit", type=int)
    args = parser.parse_args()

    names = [n for n in args.recipes.split(",") if n]
    unknown = [n for n in names if n != "base" and n not in RECIPES and n not in DATA_STEPS]
    if unknown:
        parser.error(f"unknown recipes {unknown}; known: base, {', '.join([*RECIPES, *DATA_STEPS])}")
    recipes = {name: (DATA_STEPS | RECIPES)[name] for name in names if name != "base"}
    for item in args.recipe:
        name, _, flags = item.partition("=")
        recipes[name] = shlex.split(flags)
    changed = True
    while changed:  # a recipe built on another one (or on a data step) needs that one too, first
        changed = False
        for name, flags in list(recipes.items()):
            for dep in needs(flags):
                if dep not in recipes:
                    recipes = {dep: (DATA_STEPS | RECIPES)[dep], **recipes}
                    changed = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: str(out / name / "data.jsonl") if name in DATA_STEPS else str(out / name) for name in recipes}
    cli = [sys.executable, "-m", "manyinone"]
    common = ["--model", args.model, "--data", args.data, "--rows", args.train_rows, "--epochs", args.epochs,
              "--batch-size", args.batch_size, "--lr", args.lr, "--set", "max_length=512",
              "--set", f"template={args.template}", "--quiet", *(["--set", "compile_layers=true"] if args.compile else [])]
    tasks = (["--text", args.text] if args.text else []) + (["--qa", args.qa] if args.qa else []) \
        + (["--qa-limit", str(args.qa_limit)] if args.qa_limit else [])
    trained: dict[str, Future] = {}
    results: dict[str, dict] = {}
    if args.resume and (out / "results.json").is_file():
        results = json.loads((out / "results.json").read_text())
    # data step -> its own seconds (without the teacher it needs; older results only kept the total)
    data_done = {n: d.get("own_seconds", d["seconds"]) for n, d in results.get("_data", {}).items()}
    lock = threading.Lock()
    gen = ["--gen-prompts", str(args.gen_prompts), "--gen-tokens", "128"] if args.gen_prompts else []

    def cost_of(names: list[str]) -> float:
        """GPU seconds of `names` and everything they build on, each step counted once (a recipe whose
        teacher also wrote its data pays for that teacher once)."""
        seen: set[str] = set()
        stack = list(names)
        while stack:
            name = stack.pop()
            if name not in seen:
                seen.add(name)
                stack += needs(recipes.get(name, []))
        return sum(results.get(n, {}).get("cost", {}).get("train_s", data_done.get(n, 0.0)) for n in seen)

    def train_and_eval(recipe: str) -> None:
        run_dir = out / recipe
        run_dir.mkdir(parents=True, exist_ok=True)
        log = run_dir / "log.txt" if args.jobs > 1 else None
        deps = needs(recipes.get(recipe, []))
        for dep in deps:  # wait for the recipes and data this one starts from
            trained[dep].result()
        started = time.perf_counter()
        if recipe in DATA_STEPS:
            target = Path(paths[recipe])
            if target.is_file() and recipe in data_done:  # made by an earlier call: keep its measured cost
                return
            made_here = not target.is_file()
            if made_here:
                flags = substitute(recipes[recipe], paths)
                if PREFIX_TEXT in flags:
                    if not args.prefix_text:
                        raise RuntimeError(f"data step {recipe} continues raw-text prefixes: give --prefix-text")
                    flags = [args.prefix_text if f == PREFIX_TEXT else f for f in flags]
                run(cli + ["distill-data", "--output", str(target), "--data", args.data, "--rows", args.train_rows,
                           "--template", args.template, *flags], log)
            with lock:
                # A file an earlier call finished without recording its cost has none we can honestly give.
                data_done[recipe] = time.perf_counter() - started if made_here else float("nan")
                results.setdefault("_data", {})[recipe] = {"seconds": data_done[recipe] + cost_of(deps),
                                                           "own_seconds": data_done[recipe],
                                                           "records": sum(1 for _ in target.open())}
                (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")  # kept if the call is cut short
            return
        if recipe == "base":
            target = args.model
        else:
            run(cli + ["train", "--output", str(run_dir), *common, "--set", f"save_every={args.save_every}",
                       *substitute(recipes[recipe], paths)], log)
            target = str(run_dir)
        trained_s = time.perf_counter() - started
        # Steps summed from metrics.jsonl count a resumed run whole; the wall clock of this call would not.
        train_s = train_metrics(run_dir)["train_s"] if recipe != "base" else 0.0
        slices = {}
        for part, rows in (("dev", args.eval_rows), ("holdout", args.holdout_rows)):
            report = run_dir / f"eval-{part}"
            run(cli + ["eval", target, "--data", args.data, "--rows", rows, "--exits", EXITS,
                       "--template", args.template, "--batch-size", "32", "--output", str(report), *gen,
                       *(tasks if part == "dev" else [])],
                None if log is None else run_dir / f"eval-{part}-log.txt")
            slices[part] = json.loads((report / "eval.json").read_text())
        elapsed = time.perf_counter() - started
        with lock:
            results[recipe] = {"exits": merge_slices(slices["dev"], slices["holdout"]),
                               "cost": {"train_s": train_s, "eval_s": elapsed - trained_s,
                                        "total_s": train_s + cost_of(deps)},
                               **({} if recipe == "base" else {"train": train_metrics(run_dir),
                                                               "flags": recipes[recipe]})}
            ordered = {n: results[n] for n in ["base", *recipes, *results] if n in results and n not in DATA_STEPS}
            (out / "results.json").write_text(json.dumps(ordered, indent=2) + "\n")
            shown = {n: r for n, r in ordered.items() if n != "_data"}
            (out / "results.md").write_text(tables(shown) + data_table(ordered.get("_data", {})) + "\n")
            plot(shown, out / "quality.png")

    order: list[str] = ["base"] if "base" in names else []

    def visit(name: str) -> None:  # dependencies first, so a waiting recipe never blocks what it waits for
        if name not in order:
            for dep in needs(recipes[name]):
                visit(dep)
            order.append(name)

    for name in recipes:
        visit(name)
    # Finished: in results.json and still on disk (a later recipe may start from its folder).
    finished = {n for n in results if n in order and "exits" in results[n]
                and (n == "base" or (out / n / "manyinone.json").is_file())}
    with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        for name in order:  # submitted in dependency order, so a waiting recipe never blocks its own base
            if name in finished:
                done: Future = Future()
                done.set_result(None)
                trained[name] = done
                print(f"{name}: kept from {out / 'results.json'}", flush=True)
            else:
                trained[name] = pool.submit(train_and_eval, name)
    failed = [n for n, f in trained.items() if f.exception() is not None]
    for name in failed:
        print(f"recipe {name} failed: {trained[name].exception()}", file=sys.stderr)
    print((out / "results.md").read_text() if (out / "results.md").exists() else "no recipe finished")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
