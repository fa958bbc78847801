"""Train recipes from the same start through `manyinone train`, evaluate every exit, tabulate.

One command on the GPU machine (the SmolLM2 + Alpaca setting of ../shared/assets/README.md):
    python benchmarks/quality.py --model /root/smollm2-hf --data ../shared/assets/data/alpaca_2000.json \
        --recipes base,sft,sft-heads,soft,manyinone --jobs 4 --out runs/quality \
        --text ../shared/assets/data/wikitext2_raw_test.txt --qa ../shared/assets/data/triviaqa_1k.jsonl
Writes <out>/results.json, <out>/results.md (tables) and <out>/quality.png (relative cost vs
held-out loss, one line per recipe). Results are rewritten as each recipe finishes, so a run cut
short still leaves every finished recipe's numbers.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import threading
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
}


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
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = rows[5:] or rows  # the first steps include allocator and kernel warm-up
    out = {"step_time_s": statistics.median(r["step_time_s"] for r in steady),
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

    lines = per_exit("Held-out loss per response token (Alpaca 1800-1999, lower is better)", "loss", ".3f", train_cells)
    lines += per_exit("Perplexity on WikiText-2 test (lower is better)", "text_ppl", ".1f")
    lines += per_exit("Top-1 agreement with the same model's full depth", "top1_agreement", ".3f")
    lines += per_exit("TriviaQA exact match, closed book, greedy (higher is better)", "qa_em", ".3f")
    lines += per_exit("TriviaQA: an answer alias appears in the answer (lenient)", "qa_contains", ".3f")
    return "\n".join(lines)


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
    parser.add_argument("--eval-rows", default="1800:2000")
    parser.add_argument("--recipes", default="base,sft,soft", help=f"comma-separated: base and {sorted(RECIPES)}")
    parser.add_argument("--recipe", action="append", default=[], metavar="NAME=FLAGS",
                        help="an extra recipe: `manyinone train` flags, e.g. 'soft-hi=--exits 6,30 --lr 1e-4'")
    parser.add_argument("--jobs", type=int, default=1, help="recipes trained at once (one GPU holds several)")
    parser.add_argument("--out", default="runs/quality")
    parser.add_argument("--epochs", default="2")
    parser.add_argument("--batch-size", default="16")
    parser.add_argument("--lr", default="5e-5")
    parser.add_argument("--template", default="alpaca")
    parser.add_argument("--text", help="raw text for per-exit perplexity (WikiText-2 test)")
    parser.add_argument("--qa", help="QA .jsonl for per-exit exact match (TriviaQA 1k)")
    parser.add_argument("--qa-limit", type=int)
    args = parser.parse_args()

    names = [n for n in args.recipes.split(",") if n]
    unknown = [n for n in names if n != "base" and n not in RECIPES]
    if unknown:
        parser.error(f"unknown recipes {unknown}; known: base, {', '.join(RECIPES)}")
    recipes = {name: RECIPES[name] for name in names if name != "base"}
    for item in args.recipe:
        name, _, flags = item.partition("=")
        recipes[name] = shlex.split(flags)
    for name, flags in list(recipes.items()):  # a recipe built on another one needs that one too
        for flag in flags:
            if flag.startswith("@") and flag[1:] not in recipes:
                recipes = {flag[1:]: RECIPES[flag[1:]], **recipes}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "manyinone"]
    common = ["--model", args.model, "--data", args.data, "--rows", args.train_rows, "--epochs", args.epochs,
              "--batch-size", args.batch_size, "--lr", args.lr, "--set", "max_length=512",
              "--set", f"template={args.template}", "--quiet"]
    tasks = (["--text", args.text] if args.text else []) + (["--qa", args.qa] if args.qa else []) \
        + (["--qa-limit", str(args.qa_limit)] if args.qa_limit else [])
    trained: dict[str, Future] = {}
    results: dict[str, dict] = {}
    lock = threading.Lock()

    def train_and_eval(recipe: str) -> None:
        run_dir = out / recipe
        run_dir.mkdir(parents=True, exist_ok=True)
        log = run_dir / "log.txt" if args.jobs > 1 else None
        if recipe == "base":
            target = args.model
        else:
            flags = []
            for flag in recipes[recipe]:
                if flag.startswith("@"):  # wait for the recipe this one starts from
                    trained[flag[1:]].result()
                    flag = str(out / flag[1:])
                flags.append(flag)
            run(cli + ["train", "--output", str(run_dir), *common, *flags], log)
            target = str(run_dir)
        run(cli + ["eval", target, "--data", args.data, "--rows", args.eval_rows, "--exits", EXITS,
                   "--template", args.template, "--batch-size", "32", "--output", str(run_dir), *tasks],
            None if log is None else run_dir / "eval-log.txt")
        with lock:
            results[recipe] = {"exits": json.loads((run_dir / "eval.json").read_text()),
                               **({} if recipe == "base" else {"train": train_metrics(run_dir),
                                                               "flags": recipes[recipe]})}
            ordered = {n: results[n] for n in ["base", *recipes] if n in results}
            (out / "results.json").write_text(json.dumps(ordered, indent=2) + "\n")
            (out / "results.md").write_text(tables(ordered) + "\n")
            plot(ordered, out / "quality.png")

    order = (["base"] if "base" in names else []) + list(recipes)
    with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        for name in order:  # submitted in dependency order, so a waiting recipe never blocks its own base
            trained[name] = pool.submit(train_and_eval, name)
    failed = [n for n, f in trained.items() if f.exception() is not None]
    for name in failed:
        print(f"recipe {name} failed: {trained[name].exception()}", file=sys.stderr)
    print((out / "results.md").read_text() if (out / "results.md").exists() else "no recipe finished")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
