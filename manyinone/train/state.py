"""A run's resumable state: what each saved step holds, how a run picks up from its newest one, and
the checks that the folder being resumed holds this same run.

One process writes safetensors weights (or only the trainable ones, for LoRA) and the optimizer's
state; under torchrun `train.distributed` writes sharded checkpoints instead. `saver` and `restore`
pick the right one, so the loop never branches on it.
"""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, load_model, save_file, save_model

from manyinone.core.errors import ManyinoneError
from manyinone.io.checkpoint import CHECKPOINTS, complete_resume_dirs, read_resume_state, resume_corrupt, resume_dir
from manyinone.io.durable import atomic_dir, write_failure, write_text_durably
from manyinone.train import distributed, lora
from manyinone.train.config import TrainConfig

TRAINABLE_FILE = "trainable.safetensors"
# Settings a resumed run may change: where and how long it runs, not what it trains.
RESUMABLE_CHANGES = ("output", "max_steps", "save_every", "keep_checkpoints", "device", "compile_layers", "report_to",
                     "nonfinite_skips")


def save_state(output: Path, step: int, model, optimizer, keep: int, trainable_only: bool = False) -> Path:
    """Everything needed to continue after optimizer step `step` (state.json marks completeness).

    `trainable_only` (LoRA): only the parameters that train are saved (trainable.safetensors); the
    frozen base is reloaded bit for bit from its source, so a 13B run's state is megabytes, not 26 GB."""
    target = resume_dir(output, step)
    with atomic_dir(target, checksums=True) as tmp:
        if trainable_only:
            save_file({k: v.contiguous() for k, v in lora.trainable_state(model).items()}, str(tmp / TRAINABLE_FILE))
        else:
            save_model(model, str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **({"weights": "trainable"} if trainable_only else {})}))
    for old in complete_resume_dirs(output)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _load_trainable(model, path: Path) -> None:
    """Load a LoRA run's saved trainable parameters; every one must be there, and nothing else."""
    saved = load_file(str(path))
    params = dict(model.named_parameters())
    expected = set(lora.trainable_state(model))
    if set(saved) != expected:
        missing, extra = sorted(expected - set(saved)), sorted(set(saved) - expected)
        raise ValueError(f"trainable parameters differ: missing {missing[:2]}, unexpected {extra[:2]}")
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor)


def restore_state(output: Path, model, optimizer) -> int:
    """Load the newest complete checkpoint under `output`, checksums verified; returns the next step (0 if none).

    Folders of saves a crash cut short (`.step-N.tmp-*`) never count as complete: removed here.
    """
    for stale in (output / CHECKPOINTS).glob(".step-*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    dirs = complete_resume_dirs(output)
    if not dirs:
        return 0
    last = dirs[-1]
    state = read_resume_state(last)
    step, written_by = state["step"], state.get("world")
    if written_by:
        raise ManyinoneError(f"resume checkpoint {str(last)!r} was written by {written_by} processes under torchrun; "
                             f"resume with torchrun --nproc-per-node {written_by} (or start a new --output)")
    try:
        if state.get("weights") == "trainable":
            _load_trainable(model, last / TRAINABLE_FILE)
        else:
            load_model(model, str(last / "model.safetensors"))
        optimizer.load_state_dict(torch.load(last / "optimizer.pt", weights_only=True, map_location="cpu"))
    except Exception as exc:
        raise resume_corrupt(last, exc) from None
    return step


def saver(rt: distributed.Runtime, trainable_only: bool) -> Callable[..., Path]:
    """This run's `save(output, step, model, optimizer, keep)`: sharded under torchrun, else `save_state`."""
    if rt.distributed:
        return functools.partial(distributed.save_state, rt)
    return functools.partial(save_state, trainable_only=trainable_only)


def restore(rt: distributed.Runtime, output: Path, model, optimizer) -> int:
    """The step to start from after loading this run's newest resumable state (0: a fresh run)."""
    if rt.distributed:
        return distributed.restore_state(rt, output, model, optimizer)
    return restore_state(output, model, optimizer)


def check_same_run(output: Path, cfg: TrainConfig) -> None:
    """A folder with resumable state resumes only the run that wrote it (RESUMABLE_CHANGES aside)."""
    saved = output / "train_config.yaml"
    if complete_resume_dirs(output) and saved.is_file():
        try:
            before = TrainConfig(**yaml.safe_load(saved.read_text()))
        except Exception as exc:  # YAML or validation errors: the file was edited or damaged
            raise ManyinoneError(f"output {str(output)!r} holds an unreadable train_config.yaml ({type(exc).__name__}); "
                                 "restore it or use a new --output") from None
        changed = [k for k in TrainConfig.model_fields
                   if k not in RESUMABLE_CHANGES and getattr(before, k) != getattr(cfg, k)]
        if changed:
            raise ManyinoneError(f"output {str(output)!r} holds a run with different settings {changed}; use a new --output")


def write_config(output: Path, cfg: TrainConfig) -> None:
    """train_config.yaml: the settings resumes are checked against (an unwritable output fails here,
    before any training time is spent)."""
    try:
        output.mkdir(parents=True, exist_ok=True)
        write_text_durably(output / "train_config.yaml", yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    except OSError as exc:
        raise write_failure(output, exc) from None


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Every step's metrics of a run folder (its metrics.jsonl), in order: what benchmarks read."""
    text = (Path(run_dir) / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def metrics_from(path: Path, start: int):
    """Open metrics.jsonl for appending, dropping lines of steps after `start` (a crashed run's tail,
    including a line a kill cut in half)."""
    def step_of(line: str) -> int | None:
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            return None

    if path.is_file():
        kept = [line for line in path.read_text(errors="replace").splitlines() if (step_of(line) or start + 1) <= start]
        write_text_durably(path, "".join(line + "\n" for line in kept))
    return path.open("a")
