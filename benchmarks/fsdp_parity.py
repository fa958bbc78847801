"""Issue 17's loss-curve check: the same `manyinone train` run on 1 process at grad_accum 2G and on
G processes (torchrun, FSDP2) at grad_accum 2, the same global batch, side by side; prints each
step's loss and their relative difference, then the largest. Runs on GPUs (NCCL) or CPUs (gloo).

    python benchmarks/fsdp_parity.py --model /root/smollm2-hf --data /root/data/alpaca_2000.json \
        --steps 20 --gpus 2 --workdir /tmp/fsdp_parity
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def train(args, output: Path, processes: int, grad_accum: int) -> float:
    command = ["-m", "manyinone", "train", "--model", args.model, "--data", args.data, "--rows", args.rows,
               "--exits", args.exits, "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--output", str(output), "--quiet", "--set", f"grad_accum={grad_accum}",
               "--set", f"max_length={args.max_length}", "--set", f"device={args.device}",
               "--set", "min_lr_ratio=1.0", "--set", "save_every=0"]
    launch = [sys.executable, *command] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes), *command]
    started = time.perf_counter()
    done = subprocess.run(launch, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        sys.exit(f"{processes}-process run failed (rc={done.returncode}): {done.stderr[-3000:]}")
    return time.perf_counter() - started


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--rows", default="0:1800")
    parser.add_argument("--exits", default="6,12,18,24,30")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=2, help="per process and micro-batch")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--gpus", type=int, default=2, help="processes of the sharded run")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--workdir", default="/tmp/fsdp_parity")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="relative, per step")
    args = parser.parse_args()
    work = Path(args.workdir)
    one, many = work / "one", work / f"fsdp-{args.gpus}"
    seconds = {1: train(args, one, 1, 2 * args.gpus), args.gpus: train(args, many, args.gpus, 2)}
    a, b = losses(one), losses(many)
    print(f"| step | loss, 1 process (grad_accum {2 * args.gpus}) | loss, {args.gpus} processes FSDP2 (grad_accum 2) "
          "| relative difference |\n| --- | --- | --- | --- |")
    worst = 0.0
    for step, (x, y) in enumerate(zip(a, b), 1):
        rel = abs(x - y) / max(abs(x), 1e-12)
        worst = max(worst, rel)
        print(f"| {step} | {x:.6f} | {y:.6f} | {rel:.2e} |")
    print(f"\nsteps {len(a)} and {len(b)}; largest relative difference {worst:.2e} (tolerance {args.tolerance:g}): "
          f"{'met' if worst <= args.tolerance and len(a) == len(b) == args.steps else 'NOT met'}; "
          f"wall {seconds[1]:.0f} s and {seconds[args.gpus]:.0f} s")


if __name__ == "__main__":
    main()
