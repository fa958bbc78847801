"""Long-run soak on CPU: a small model trained for many steps with periodic checkpoints, while
resident memory, live tensors and module hooks are sampled; any upward drift is a leak (autograd
graphs kept alive, hooks added per step, metrics held in memory). Also checks that metrics.jsonl,
the progress bar and the kept checkpoints stay correct to the last step.

    python benchmarks/soak.py                       # 3000 steps, checkpoint every 50 (~5 min, 2 cores)
    python benchmarks/soak.py --smoke               # 200 steps, a few seconds
    python benchmarks/soak.py --steps 20000 --json soak.json

Exit code 1 when a check fails. tests/reliability/test_soak.py runs a short version in CI.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


def rss_bytes() -> int:
    """Resident set size now (Linux /proc; elsewhere the peak, which still shows growth)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def live_tensors() -> int:
    """Tensors the garbage collector can see (parameters, optimizer state, anything leaked)."""
    import torch

    # type() rather than isinstance(): the latter pokes lazy module proxies that warn when touched.
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def soak(model_dir: Path, output: Path, steps: int, save_every: int, sample_every: int = 10) -> dict:
    """Train `steps` steps in this process, sampling memory every `sample_every`; returns the figures."""
    import torch

    import manyinone.train.loop as train_module
    import manyinone.train.model_setup as setup_module
    from manyinone.train.config import TrainConfig

    torch.set_num_threads(1)
    cfg = TrainConfig(model=str(model_dir), output=str(output), exits=[2, 4], data="demo", batch_size=2,
                      max_length=200, lr=1e-3, warmup_steps=10, max_steps=steps, save_every=save_every,
                      keep_checkpoints=2)
    seen: dict = {}
    samples: list[dict] = []
    real_adapter_for, real_update, real_exit = (setup_module.adapter_for, train_module.TrainProgress.update,
                                                train_module.TrainProgress.__exit__)

    def adapter_for(model, *args, **kwargs):  # keep a handle on the model to count its hooks
        seen["model"] = model
        return real_adapter_for(model, *args, **kwargs)

    def update(self, step, record):
        real_update(self, step, record)
        if step % sample_every == 0 or step == steps:
            gc.collect()
            samples.append({"step": step, "rss_mib": rss_bytes() / MIB, "live_tensors": live_tensors(),
                            "hooks": hook_count(seen["model"]), "t": time.perf_counter()})

    def exit_(self, *exc):
        seen["progress_completed"] = self.progress.tasks[0].completed
        seen["progress_total"] = self.progress.tasks[0].total
        return real_exit(self, *exc)

    setup_module.adapter_for, train_module.TrainProgress.update = adapter_for, update
    train_module.TrainProgress.__exit__ = exit_
    try:
        started = time.perf_counter()
        train_module.train(cfg, show_progress=True)  # the real progress bar (to stderr)
        seconds = time.perf_counter() - started
    finally:
        setup_module.adapter_for, train_module.TrainProgress.update = real_adapter_for, real_update
        train_module.TrainProgress.__exit__ = real_exit
    return {"steps": steps, "save_every": save_every, "seconds": seconds, "samples": samples,
            **check(output, cfg, samples, seen)}


def check(output: Path, cfg, samples: list[dict], seen: dict) -> dict:
    """Memory flat after warm-up, metrics exact for every step, the right checkpoints kept."""
    from manyinone.train.loop import lr_at

    steps = cfg.max_steps
    warm = [s for s in samples if s["step"] > steps // 5]  # allocator and caches settle in the first fifth
    half = len(warm) // 2
    early = sorted(s["rss_mib"] for s in warm[:half])
    late = sorted(s["rss_mib"] for s in warm[half:])
    rss_growth = late[len(late) // 2] - early[len(early) // 2]  # median of late half minus early half
    tensors = {s["live_tensors"] for s in warm}
    hooks = {s["hooks"] for s in samples}

    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    metrics_ok = ([r["step"] for r in records] == list(range(1, steps + 1))
                  and all(math.isfinite(r["loss"]) and r["tokens"] > 0 for r in records)
                  and all(abs(r["lr"] - lr_at(r["step"] - 1, cfg, steps)) < 1e-12 for r in records))
    kept = sorted(p.name for p in (output / "checkpoints").iterdir())
    last_saves = sorted({s for s in range(cfg.save_every, steps, cfg.save_every)} | {steps})[-cfg.keep_checkpoints:]
    checkpoints_ok = kept == [f"step-{s:07d}" for s in last_saves]
    progress_ok = seen.get("progress_completed") == seen.get("progress_total") == steps
    figures = {
        "rss_start_mib": warm[0]["rss_mib"], "rss_end_mib": warm[-1]["rss_mib"], "rss_growth_mib": rss_growth,
        "rss_max_mib": max(s["rss_mib"] for s in warm), "live_tensors": sorted(tensors), "hooks": sorted(hooks),
        "metrics_ok": metrics_ok, "checkpoints_ok": checkpoints_ok, "progress_ok": progress_ok, "kept": kept,
    }
    # Flat: a leaked graph per step costs ~1 MiB here, i.e. hundreds of MiB over a soak.
    figures["passed"] = (rss_growth < 20 and len(tensors) == 1 and len(hooks) == 1
                         and metrics_ok and checkpoints_ok and progress_ok)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--save-every", type=int, default=50)
    parser.add_argument("--sample-every", type=int, default=25)
    parser.add_argument("--smoke", action="store_true", help="200 steps, checkpoint every 20")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.save_every, args.sample_every = 200, 20, 10

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model(Path(tmp) / "model")
        result = soak(model, Path(tmp) / "run", args.steps, args.save_every, args.sample_every)
    samples = result.pop("samples")
    print(f"{'step':>7} {'RSS MiB':>9} {'tensors':>8} {'hooks':>6}")
    for s in samples[:: max(len(samples) // 20, 1)] + samples[-1:]:
        print(f"{s['step']:>7} {s['rss_mib']:>9.1f} {s['live_tensors']:>8} {s['hooks']:>6}")
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps({**result, "samples": samples}, indent=1))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
