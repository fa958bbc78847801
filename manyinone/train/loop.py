"""The one training recipe: an explicit loop over nested sub-networks.

Plain SFT is the special case `exits=[L]` (only the full depth). Randomness derives from
(seed, step) and the data order from (seed, epoch), so a run resumed from its last checkpoint
retraces the uninterrupted run exactly.

`_train` reads top to bottom as the run goes: load and wrap the model, read the data
(`train.batches`), place it, resume or start (`train.state`), then step (`_Run.step`) and save
the final budget-indexed checkpoint (`_save_final`).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from manyinone.train import distributed, state
from manyinone.train import exit_heads, lora, nonfinite
from manyinone.io.checkpoint import CHECKPOINTS, build_index, complete_resume_dirs, save_checkpoint
from manyinone.io.durable import write_failure
from manyinone.train.batches import MicroBatches, load_run_data
from manyinone.train.config import TrainConfig
from manyinone.train.data import batch_tokens, resolve_template
from manyinone.core.device import pick_device
from manyinone.core.errors import ManyinoneError
from manyinone.train.interrupt import deferred_stop_signals
from manyinone.train.on_policy import runtime_sampler as on_policy_sampler
from manyinone.train import model_setup, step_parts
from manyinone.train.losses import exit_weights
from manyinone.train.progress import TrainProgress
from manyinone.train.reporting import Reporter
from manyinone.elastic.reorder import reorder_by_importance
from manyinone.train.samplers import Sampler, sampler_for
from manyinone.train.optim import check_precision, make_optimizer, set_lr, training_dtype
from manyinone.train.state import TRAINABLE_FILE  # its old home: tests and scripts import it from here

__all__ = ["TRAINABLE_FILE", "lr_at", "run_lock", "train"]
from manyinone.train.teacher import Teacher


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(total_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))



# --- one run per output folder -----------------------------------------------------------------
LOCK_FILE = ".manyinone.lock"


@contextmanager
def run_lock(output: Path) -> Iterator[None]:
    """Hold run folder `output` for this process (an exclusive flock on its lock file, which records
    our PID); a second run on it fails at once naming the first. The lock ends with the process."""
    import fcntl

    created = not output.exists()
    try:
        output.mkdir(parents=True, exist_ok=True)
        fd = os.open(output / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:  # an unwritable output fails here, before any training time is spent
        raise write_failure(output, exc) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise ManyinoneError(f"output {str(output)!r} is in use by another manyinone train (PID {pid}); "
                                 "wait for it to end or choose another --output") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        except BaseException:
            if created and os.listdir(output) == [LOCK_FILE]:  # a run that failed before writing anything
                os.unlink(output / LOCK_FILE)
                output.rmdir()
            raise
    finally:
        os.close(fd)


def _refuse_base_model_folder(cfg: TrainConfig) -> None:
    """The final checkpoint is merged into the output folder: the base model's own folder would lose its weights."""
    model = Path(cfg.model).expanduser()
    folder = model.parent if cfg.model.endswith(".gguf") else model
    if folder.is_dir() and folder.resolve() == Path(cfg.output).expanduser().resolve():
        raise ManyinoneError(f"--output {cfg.output!r} is the folder of --model {cfg.model!r}; training would "
                             "overwrite the base model; choose another --output")


# --- the loop ---------------------------------------------------------------------------------
def train(cfg: TrainConfig, show_progress: bool = True) -> Path:
    """Train per `cfg`; write the final budget-indexed checkpoint into `cfg.output` and return it.

    The output folder is held for the whole run (`run_lock`; under torchrun by rank 0)."""
    _refuse_base_model_folder(cfg)
    if distributed.Runtime.from_env().is_main:
        if distributed.world_size_from_env() <= 1:
            pick_device(cfg.device)  # an unusable device fails before the output folder is made
        with run_lock(Path(cfg.output)):
            return _train(cfg, show_progress)
    return _train(cfg, show_progress)


def _train(cfg: TrainConfig, show_progress: bool) -> Path:
    output = Path(cfg.output)
    rt = distributed.Runtime.from_env()  # several processes only under torchrun (WORLD_SIZE > 1)
    device = rt.device(cfg.device) if rt.distributed else pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    distributed.refuse_unsupported(rt, cfg)
    dtype = training_dtype(cfg.dtype, device, cfg.lora is not None)
    check_precision(dtype, cfg.optimizer, cfg.lora is not None)
    model, tokenizer, tuned, adapter, space, exit_modules = model_setup.load_model(cfg, rt, device, dtype)
    weights = exit_weights(space.specs(), cfg.exit_weights)
    sampler = sampler_for(cfg, space)
    # `auto` is settled here, once: train_config.yaml and the index record the template the run used.
    cfg = cfg.model_copy(update={"template": resolve_template(cfg.template, tokenizer)})
    data = load_run_data(cfg, tokenizer, rt.world)
    warning = nonfinite.zero_start_warning(model, tokenizer, (ex.input_ids[0] for ex in data.unpacked if ex.input_ids))
    if warning and rt.is_main:
        print(warning, file=sys.stderr, flush=True)
    layers = model_setup.place(model, adapter, cfg, rt, device)
    groups = model_setup.param_groups(model, exit_modules, cfg, layers)
    optimizer = make_optimizer(cfg.optimizer, groups, cfg.lr, cfg.weight_decay, device)
    state.check_same_run(output, cfg)
    save = state.saver(rt, trainable_only=tuned is not None)
    start = state.restore(rt, output, model, optimizer)
    batches = MicroBatches(data, cfg, rt, tokenizer.pad_token_id, tokenizer.eos_token_id, device)
    if start:
        print(f"resuming from step {start} ({output / CHECKPOINTS})", file=sys.stderr, flush=True)
    elif cfg.reorder and set(cfg.axes) - {"depth"}:
        # Prefixes must hold the most important units before any per-layer axis is trained (a resumed
        # run restores the already permuted weights instead); depth has no units to sort.
        reorder_by_importance(adapter, batches.calibration(cfg.calibration_batches), show_progress=show_progress)
    state.write_config(output, cfg)

    teacher, teacher_weights = _load_teacher(cfg, tokenizer, device, space)
    if cfg.on_policy_ratio > 0:
        batches.on_policy = on_policy_sampler(model, tokenizer, cfg.on_policy_tokens, cfg.on_policy_temperature,
                                              cfg.max_length)
    run = _Run(cfg, rt, device, model, adapter, space, weights, exit_modules, sampler, layers, optimizer, batches,
               data.total_steps, data.steps_per_epoch, teacher, teacher_weights)
    metrics_file = state.metrics_from(output / "metrics.jsonl", start) if rt.is_main else open(os.devnull, "w")
    progress = TrainProgress(data.total_steps, [s.label for s in space.specs()], enabled=show_progress and rt.is_main)
    reporter = Reporter(cfg.report_to if rt.is_main else [], output, cfg.model_dump(), start)
    # SIGTERM/Ctrl-C: save, then exit
    with progress, metrics_file, closing(reporter), deferred_stop_signals() as stop:
        progress.advance_to(start)
        skipped = 0  # non-finite steps skipped by this process (nonfinite_skips)
        for step in range(start, data.total_steps):
            record = run.step(step, stop)
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            reporter.log(record)
            progress.update(step + 1, record)
            if "nonfinite" in record:  # the step was not applied: stop, or skip within the allowance
                skipped = _nonfinite_step(cfg, output, record["nonfinite"], skipped)
            periodic = cfg.save_every and (step + 1) % cfg.save_every == 0
            # Under torchrun, what the ranks agreed in the step's reduction: a signal that lands on one
            # rank after it would otherwise send that rank alone into a save, the others into the next step.
            stopping = run.stop_agreed if rt.distributed else bool(stop)
            if (periodic or stopping) and step + 1 < data.total_steps:
                saved = save(output, step + 1, model, optimizer, cfg.keep_checkpoints)
                if stopping:
                    raise stop.interrupted(step + 1, saved)
    metrics_file.close()
    _save_final(run, tokenizer, tuned, save, dtype)
    rt.close()
    return output


def _nonfinite_step(cfg: TrainConfig, output: Path, summary: str, skipped: int) -> int:
    """After a step that was not applied (non-finite loss or gradient): raise the run's one-line
    error, or, within `nonfinite_skips`, warn and return the new count of skipped steps."""
    if skipped >= cfg.nonfinite_skips:
        raise nonfinite.stop_error(summary, output, complete_resume_dirs(output), skipped, cfg.nonfinite_skips)
    print(f"warning: {summary}; step skipped (no update), {skipped + 1} of nonfinite_skips={cfg.nonfinite_skips}",
          file=sys.stderr, flush=True)
    return skipped + 1


def _load_teacher(cfg: TrainConfig, tokenizer, device: torch.device, space):
    """The frozen teacher and each spec's weight of its KL term ((None, None) without a teacher)."""
    if not cfg.teacher:
        return None, None
    teacher = Teacher.load(cfg.teacher, tokenizer, cfg.output, device, getattr(torch, cfg.teacher_dtype))
    full = space.full()
    return teacher, {s: cfg.teacher_full_weight if s == full else cfg.teacher_weight for s in space.specs()}


@dataclass
class _Run:
    """What every optimizer step reads, built once by `_train`."""

    cfg: TrainConfig
    rt: distributed.Runtime
    device: torch.device
    model: Any
    adapter: Any
    space: Any
    weights: dict
    exit_modules: Any
    sampler: Sampler
    layers: list | None
    optimizer: Any
    batches: MicroBatches
    total_steps: int
    steps_per_epoch: int
    teacher: Teacher | None = None
    teacher_weights: dict | None = None
    stop_agreed: bool = False  # a stop signal had reached some rank by the last step's reduction

    def step(self, step: int, stop) -> dict[str, Any]:
        """One optimizer step (grad_accum micro-batches, every rank together); returns its metrics record."""
        cfg, device = self.cfg, self.device
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
        started = time.perf_counter()
        torch.manual_seed(cfg.seed * 1_000_003 + step)  # dropout etc. replay exactly after a resume
        lr = lr_at(step, cfg, self.total_steps)
        for group in self.optimizer.param_groups:
            set_lr(group, lr * group.get("lr_scale", 1.0))  # runs saved before exit modules have none
        sampled = self.sampler.sample(step)
        sums: dict[str, float] = {}
        tokens = 0
        teacher_s = on_policy_s = 0.0
        teacher_target = None
        for micro in range(cfg.grad_accum):
            sampled_at = time.perf_counter()
            batch = self.batches(step, micro)
            on_policy_s += time.perf_counter() - sampled_at  # sampling is most of it when on-policy
            if self.teacher is not None:  # the teacher's forward is part of the step: timed on its own
                teacher_started = time.perf_counter()
                teacher_target = step_parts.teacher_target(self.teacher, batch, autocast, self.teacher_weights, cfg)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                teacher_s += time.perf_counter() - teacher_started
            dropout = step_parts.layer_dropout(cfg, self.layers, step, micro, batch["input_ids"].shape[0])
            with autocast, dropout:
                # Packed rows pass position_ids (and no mask); plain rows call exactly as before.
                packed = {"position_ids": batch["position_ids"]} if "position_ids" in batch else {}
                hidden = exit_heads.forward_nested(self.adapter, self.exit_modules, batch["input_ids"],
                                                   batch.get("attention_mask"), sampled, **packed)
                out = step_parts.exit_losses(cfg, self.adapter, self.space, self.exit_modules, self.weights, hidden,
                                             batch["labels"], teacher_target, step, micro)
            (out.total / cfg.grad_accum).backward()
            tokens += batch_tokens(batch)
            step_parts.add_to_sums(sums, out, cfg.grad_accum)
        # clip_grad_norm_ in its two halves: a non-finite norm would scale every gradient by NaN and
        # hide which parameter went bad first; it is clipped only once known to be finite.
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = nonfinite.grad_norm(params)
        sums["_stop"] = float(bool(stop))  # every rank must agree to stop at the same step
        # Over ranks before the update: a NaN on any rank reaches every rank's mean, so all of them
        # agree on skipping the update below (FSDP2's grad norm is already the global one).
        sums, tokens = self.rt.mean(sums), self.rt.total(tokens)
        self.stop_agreed = sums.pop("_stop") > 0
        if self.stop_agreed and not stop:
            stop.signum = signal.SIGTERM  # another rank was signalled (torchrun forwards SIGTERM)
        sums["grad_norm"] = distributed.scalar(grad_norm)  # a sync, as the losses' .item() just before it
        bad = nonfinite.nonfinite_metrics(sums)
        failure = None
        if bad:  # no NaN or inf is ever written into the weights or the optimizer's moments
            grads = nonfinite.nonfinite_grads(self.model.named_parameters()) if "grad_norm" in bad else []
            failure = nonfinite.describe(step + 1, sums, bad, grads)
        else:
            nonfinite.clip_to(params, cfg.max_grad_norm, grad_norm)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - started
        record = {"step": step + 1, "epoch": (step + 1) / self.steps_per_epoch, "lr": lr, **sums,
                  **({"nonfinite": failure} if failure else {}), "tokens": tokens, "step_time_s": elapsed,
                  "tokens_per_s": tokens / elapsed, **({"teacher_s": teacher_s} if self.teacher is not None else {}),
                  **({"on_policy_s": on_policy_s} if self.batches.on_policy is not None else {})}
        if device.type == "cuda":
            record["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        return record


def _save_final(run: _Run, tokenizer, tuned, save: Callable[..., Path], dtype: torch.dtype) -> None:
    """The final budget-indexed checkpoint into the output folder, and the last resumable state."""
    cfg, rt, model, output = run.cfg, run.rt, run.model, Path(run.cfg.output)
    model.eval()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    record = {"model": cfg.model, "data": cfg.data, "rows": cfg.rows, "template": cfg.template, "steps": run.total_steps}
    with deferred_stop_signals():  # the run is done: a stop signal now waits for these two saves
        if tuned is not None:
            # The resumable state first (it needs the adapters unmerged), then the adapters are folded
            # into the base: the checkpoint is a plain HF model every reader already serves.
            save(output, run.total_steps, model, run.optimizer, cfg.keep_checkpoints)
            with exit_heads.detached(model) as trained_heads:
                model = lora.merge(tuned)
            if trained_heads is not None:
                exit_heads.attach(model, trained_heads)
            record["tuning"] = lora.describe(cfg.lora)
        heads = run.exit_modules
        index = build_index(run.adapter, run.space, metric=cfg.cost_metric, train=record,
                            one_more_layer=heads.with_blocks() if heads is not None else ())
        final = (distributed.unsharded_copy(rt, model, lambda: model_setup.skeleton(cfg, run.space, dtype)) if rt.distributed
                 else model.to("cpu"))
        if rt.is_main:
            with exit_heads.detached(final) as trained_heads:
                save_checkpoint(final, tokenizer, index, output, merge=True, exit_heads=trained_heads)
        if tuned is None:
            save(output, run.total_steps, model, run.optimizer, cfg.keep_checkpoints)
