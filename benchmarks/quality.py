"""Train recipes from the same start through `manyinone train`, evaluate every exit, tabulate.

One command on the GPU machine (the SmolLM2 + Alpaca setting of ../shared/assets/README.md):
    python benchmarks/quality.py --model /root/smollm2.gguf \
        --data ../shared/assets/data/alpaca_2000.json --recipes base,sft,soft --out runs/quality
Writes <out>/results.json, <out>/results.md and <out>/quality.png (relative cost vs held-out loss).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

EXITS = "6,12,18,24,30"
# Each recipe is a set of `manyinone train` flags on top of the common ones.
RECIPES: dict[str, list[str]] = {
    "sft": ["--exits", "30"],
    "soft": ["--exits", EXITS],
    "soft-kd": ["--exits", EXITS, "--set", "distill_weight=1.0"],
    "soft-kd-t2": ["--exits", EXITS, "--set", "distill_weight=1.0", "--set", "distill_temperature=2.0"],
    "soft-kd-w": ["--exits", EXITS, "--set", "distill_weight=1.0", "--set", "exit_weights=[0.5,0.5,1,1,2]"],
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--train-rows", default="0:1800")
    parser.add_argument("--eval-rows", default="1800:2000")
    parser.add_argument("--recipes", default="base,sft,soft", help=f"comma-separated, from {sorted(RECIPES)}")
    parser.add_argument("--recipe", action="append", default=[], metavar="NAME=FLAGS",
                        help="an extra recipe: `manyinone train` flags, e.g. 'soft-hi=--exits 6,30 --lr 1e-4'")
    parser.add_argument("--jobs", type=int, default=1, help="recipes trained at once (one GPU holds several)")
    parser.add_argument("--out", default="runs/quality")
    parser.add_argument("--epochs", default="2")
    parser.add_argument("--batch-size", default="16")
    parser.add_argument("--lr", default="5e-5")
    parser.add_argument("--template", default="alpaca")
    args = parser.parse_args()

    recipes = {name: RECIPES[name] for name in args.recipes.split(",") if name and name != "base"}
    for item in args.recipe:
        name, _, flags = item.partition("=")
        recipes[name] = shlex.split(flags)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "manyinone"]
    common = ["--data", args.data, "--rows", args.train_rows, "--epochs", args.epochs,
              "--batch-size", args.batch_size, "--lr", args.lr, "--set", "max_length=512",
              "--set", f"template={args.template}", "--quiet"]

    def train_and_eval(recipe: str) -> tuple[str, dict]:
        run_dir = out / recipe
        run_dir.mkdir(parents=True, exist_ok=True)
        log = run_dir / "log.txt" if args.jobs > 1 else None
        if recipe == "base":
            target = args.model
        else:  # recipe flags come last so they override the common ones
            run(cli + ["train", "--model", args.model, "--output", str(run_dir), *common, *recipes[recipe]], log)
            target = str(run_dir)
        run(cli + ["eval", target, "--data", args.data, "--rows", args.eval_rows, "--exits", EXITS,
                   "--template", args.template, "--batch-size", "16", "--output", str(run_dir)],
            None if log is None else run_dir / "eval-log.txt")
        return recipe, {"exits": json.loads((run_dir / "eval.json").read_text()),
                        **({} if recipe == "base" else {"train": train_metrics(run_dir)})}

    names = (["base"] if "base" in args.recipes.split(",") else []) + list(recipes)
    with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        results = dict(pool.map(train_and_eval, names))
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    exits = [int(e) for e in EXITS.split(",")]
    lines = ["| recipe | " + " | ".join(f"exit {e}" for e in exits) + " | step time | tokens/s | peak memory |",
             "| --- | " + " | ".join("---" for _ in exits) + " | --- | --- | --- |"]
    for recipe, res in results.items():
        losses = {r["depth"]: r["loss"] for r in res["exits"]}
        t = res.get("train", {})
        lines.append(f"| {recipe} | " + " | ".join(f"{losses[e]:.3f}" for e in exits)
                     + (f" | {t['step_time_s']:.3f} s | {t['tokens_per_s']:,.0f} | {t.get('peak_mem_gib', float('nan')):.2f} GiB |"
                        if t else " | — | — | — |"))
    table = "\n".join(lines)
    (out / "results.md").write_text(table + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for recipe, res in results.items():
        ax.plot([r["relative_cost"] for r in res["exits"]], [r["loss"] for r in res["exits"]], marker="o", label=recipe)
    ax.set_xlabel("relative cost (FLOPs per token)")
    ax.set_ylabel("held-out loss (Alpaca 1800-1999)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "quality.png", dpi=120)
    print(table)


if __name__ == "__main__":
    main()
