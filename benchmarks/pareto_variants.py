"""The training side of benchmarks/pareto.py: each variant's TrainConfig, and training them.

Every variant reads its sources in `manyinone train`'s order, a later one winning: pareto.py's
settings for the variant, every `--set` (so one teacher, one generated dataset and one number of
epochs reach all of them, issue 19), the flags given on pareto.py's command line, then the
variant's own `--variant-set NAME:KEY=VALUE` items.
"""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from manyinone.core.errors import ManyinoneError
from manyinone.train.config import TrainConfig, load_config
from manyinone.train.state import read_metrics
from manyinone.train.loop import train

# pareto.py's values of the TrainConfig fields its flags set, when the flag is not given: a `--set`
# of the field wins over them, as over a recipe's in `manyinone train`.
FLAG_DEFAULTS = {"epochs": 1.0, "batch_size": 16, "max_length": 512, "lr": 1e-4}
OWNED = ("axes", "output")  # what makes a variant itself: chosen by --variants, never by an override


def settings(args) -> dict:
    """Per-variant TrainConfig fields (defaults an override may replace); the smoke run shrinks the
    same recipes onto a 4-layer model."""
    exits = [2, 3, 4] if args.smoke else [6, 12, 15, 18, 24, 30]
    elastic = {"sampler": "sandwich", "sandwich_random": 2, "distill_weight": 0.5}
    if args.widths:
        elastic["widths"] = [int(w) for w in args.widths.split(",")]
    return {
        "depth": {"axes": ["depth"], "exits": exits},  # SoFT: every exit every step
        "width": {"axes": ["width", "heads"], **elastic},
        "depth+width": {"axes": ["depth", "width", "heads"], "exits": [2, 4] if args.smoke else [15, 20, 25, 30],
                        **elastic},
    }


def override_key(item: str) -> str:
    """The top-level TrainConfig field a `KEY=VALUE` override sets (`lora.r=16` sets lora)."""
    return item.partition("=")[0].strip().partition(".")[0]


def variant_overrides(items: list[str], names) -> dict[str, list[str]]:
    """`--variant-set NAME:KEY=VALUE` items, grouped by variant; a variant this script lacks is refused."""
    grouped: dict[str, list[str]] = {}
    for item in items:
        name, sep, override = item.partition(":")
        if not sep or name not in names:
            raise ManyinoneError(f"--variant-set {item!r}: expected NAME:KEY=VALUE with NAME one of {', '.join(names)}")
        grouped.setdefault(name, []).append(override)
    return grouped


def variant_config(defaults: dict, shared: list[str], own: list[str], flags: dict, output: str) -> TrainConfig:
    """One variant's TrainConfig from its sources in `manyinone train`'s order, a later one winning:
    this script's settings for the variant (`defaults`), every `--set` (`shared`), the flags given on
    this command line (`flags`); then the variant's own `--variant-set` items (`own`) over all of them."""
    for item in [*shared, *own]:
        if override_key(item) in OWNED:
            raise ManyinoneError(f"override {item!r}: {override_key(item)} is the variant's own; "
                                 f"pick variants with --variants")
    mine = {override_key(o) for o in own}
    fields = {k: v for k, v in defaults.items() if k not in {override_key(o) for o in shared} | mine}
    fields.update({k: v for k, v in flags.items() if k not in mine})
    return load_config(None, [*shared, *own], **fields, output=output)


def train_variants(configs: dict[str, TrainConfig], jobs: int) -> dict[str, tuple[Path, float]]:
    """Train each variant: in this process (jobs 1), or `jobs` at a time as `manyinone train --config`
    processes (one GPU holds several small runs; each logs to <output>/log.txt). Returns run folder
    and wall seconds per variant (with jobs > 1 the trainings overlap, so their seconds do too)."""
    def one(cfg: TrainConfig) -> tuple[Path, float]:
        started = time.perf_counter()
        if jobs == 1:
            return train(cfg, show_progress=False), time.perf_counter() - started
        output = Path(cfg.output)
        config = config_file(cfg)
        with (output.parent / f"{output.name}.log").open("w") as log:
            done = subprocess.run([sys.executable, "-m", "manyinone", "train", "--config", str(config), "--quiet"],
                                  stdout=log, stderr=subprocess.STDOUT)
        if done.returncode:
            tail = (output.parent / f"{output.name}.log").read_text()[-1500:]
            raise RuntimeError(f"training {output.name} failed (exit {done.returncode}):\n{tail}")
        return output, time.perf_counter() - started

    if jobs == 1:
        return {name: one(cfg) for name, cfg in configs.items()}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {name: pool.submit(one, cfg) for name, cfg in configs.items()}
        return {name: f.result() for name, f in futures.items()}


def config_file(cfg: TrainConfig) -> Path:
    """`cfg` as the YAML file `manyinone train --config` reads, beside its run folder (<output>.yaml)."""
    output = Path(cfg.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    path = output.parent / f"{output.name}.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    return path


def steps_seconds(run_dir: Path) -> tuple[int, float]:
    """(optimizer steps, their summed step time in s) from the run's metrics.jsonl."""
    rows = read_metrics(run_dir)
    return len(rows), sum(r["step_time_s"] for r in rows)


def variant_configs(args, given: dict, variants: list[str], out: Path) -> dict[str, TrainConfig]:
    """The TrainConfig of every variant that trains (the width run too when a router variant needs it),
    all checked before any training; `given` holds the TrainConfig flags given on the command line."""
    recipes = settings(args)
    own = variant_overrides(args.variant_set, list(recipes))
    # Eval tokenizes with the alpaca template, so training does too (a run's "auto" may pick a chat template).
    defaults = dict(FLAG_DEFAULTS, cost_metric="flops", template="alpaca", **({"max_steps": 3} if args.smoke else {}))
    flags = dict(model=args.model, data=args.data, rows=args.train_rows, **given)
    routers = {"routed", "adaptive", "token", "token-joint"} & set(variants)
    names = list(dict.fromkeys([v for v in variants if v in recipes] + (["width"] if routers else [])))
    return {name: variant_config({**defaults, **recipes[name]}, args.set, own.get(name, []),
                                 {**flags, **({"distill_weight": args.distill}
                                              if args.distill is not None and name != "depth" else {})},
                                 str(out / name)) for name in names}


def flags_given(args) -> dict:
    """The TrainConfig fields set by this script's flags that were given (they win over --set)."""
    return {k: getattr(args, k) for k in FLAG_DEFAULTS if getattr(args, k) is not None}
