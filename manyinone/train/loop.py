"""The one training recipe: an explicit loop over nested sub-networks.

Plain SFT is the special case `exits=[L]` (only the full depth). Randomness derives from
(seed, step) and the data order from (seed, epoch), so a run resumed from its last checkpoint
retraces the uninterrupted run exactly.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager, nullcontext
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, load_model, save_file, save_model

from manyinone.train import distributed
from manyinone.train import exit_heads, lora
from manyinone.io.checkpoint import (CHECKPOINTS, build_index, complete_resume_dirs, read_resume_state, resume_corrupt,
                                     resume_dir, save_checkpoint)
from manyinone.io.durable import atomic_dir, write_failure, write_text_durably
from manyinone.train.config import TrainConfig
from manyinone.train.data import (batch_tokens, collate, load_records, mixed_count, mixed_epoch_order, pack,
                                  resolve_template, tokenize_records)
from manyinone.core.device import pick_device
from manyinone.core.errors import ManyinoneError
from manyinone.train.interrupt import deferred_stop_signals
from manyinone.io.loading import load_pretrained
from manyinone.train.on_policy import on_policy_batch, runtime_sampler as on_policy_sampler
from manyinone.train import step_parts
from manyinone.train.losses import exit_weights
from manyinone.train.progress import TrainProgress
from manyinone.train.reporting import Reporter
from manyinone.core.registry import adapter_for
from manyinone.elastic.reorder import reorder_by_importance
from manyinone.train.samplers import make_sampler
from manyinone.train.optim import check_precision, make_optimizer, set_lr, training_dtype
from manyinone.train.teacher import Teacher


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(total_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# --- resumable state --------------------------------------------------------------------------
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


TRAINABLE_FILE = "trainable.safetensors"


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


def _check_same_run(output: Path, cfg: TrainConfig) -> None:
    saved = output / "train_config.yaml"
    if complete_resume_dirs(output) and saved.is_file():
        try:
            before = TrainConfig(**yaml.safe_load(saved.read_text()))
        except Exception as exc:  # YAML or validation errors: the file was edited or damaged
            raise ManyinoneError(f"output {str(output)!r} holds an unreadable train_config.yaml ({type(exc).__name__}); "
                                 "restore it or use a new --output") from None
        changed = [k for k in TrainConfig.model_fields
                   if k not in ("output", "max_steps", "save_every", "keep_checkpoints", "device", "compile_layers",
                                "report_to")
                   and getattr(before, k) != getattr(cfg, k)]
        if changed:
            raise ManyinoneError(f"output {str(output)!r} holds a run with different settings {changed}; use a new --output")


def _metrics_from(path: Path, start: int):
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


def _param_groups(model, heads, cfg: TrainConfig, layers=None) -> list[dict]:
    """Base weights at lr (frozen with freeze_base), exit modules at lr * exit_heads_lr_scale.

    With segment_lr_scales, the decoder layers after exit i-1 up to exit i train at lr * scales[i]
    (`layers`: the adapter's decoder layers, bottom first)."""
    own = {id(p) for p in heads.parameters()} if heads is not None else set()
    base = [p for p in model.parameters() if id(p) not in own and p.requires_grad]  # LoRA: the adapters only
    if cfg.freeze_base:
        for p in base:
            p.requires_grad_(False)
    groups = []
    if not cfg.freeze_base and cfg.segment_lr_scales is not None:
        bounds = [0, *cfg.exits]
        segments = [(scale, [p for layer in layers[lo:hi] for p in layer.parameters() if p.requires_grad])
                    for scale, lo, hi in zip(cfg.segment_lr_scales, bounds, bounds[1:])]
        in_segment = {id(p) for _, params in segments for p in params}
        groups = [{"params": params, "lr_scale": scale} for scale, params in segments if params]
        base = [p for p in base if id(p) not in in_segment]  # embeddings, final norm, head; layers past the last exit
    if not cfg.freeze_base:
        groups.insert(0, {"params": base, "lr_scale": 1.0})
    if heads is not None:
        # No weight decay: it would pull identity-initialised translators towards zero.
        groups.append({"params": list(heads.parameters()), "lr_scale": cfg.exit_heads_lr_scale, "weight_decay": 0.0})
    return groups


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
    if rt.distributed and cfg.lora is not None:
        raise ManyinoneError("lora runs on one device only (it fits a 13B model on one GPU); drop torchrun, or "
                             "use lora=null for a sharded full fine-tune")
    dtype = training_dtype(cfg.dtype, device, cfg.lora is not None)
    check_precision(dtype, cfg.optimizer, cfg.lora is not None)

    # Straight onto the GPU (transformers builds the model on the meta device and fills it from the
    # weight files): no full copy in CPU memory, so under torchrun no rank holds the whole model on
    # the CPU; each rank's GPU holds it only until FSDP2 shards it in place.
    model, tokenizer = load_pretrained(cfg.model, dtype=dtype, device=device if device.type == "cuda" else None)
    tuned = lora.apply_lora(model, cfg.lora) if cfg.lora is not None else None  # `model` itself, adapters inside
    adapter = adapter_for(model, cfg.axes)
    adapter.check_axes(cfg.axes)
    space = adapter.space(cfg.axis_choices())
    specs = space.specs()
    weights = exit_weights(specs, cfg.exit_weights)
    if rt.distributed and {"width", "heads"} & set(cfg.axes):
        raise ManyinoneError(f"axes {cfg.axes} train on one device only (width/heads slice unsharded weights); "
                             "use axes=[depth] under torchrun")
    exit_modules = None
    if cfg.exit_heads != "none":
        if rt.distributed:
            raise ManyinoneError(f"exit_heads={cfg.exit_heads!r} runs on one device only; use exit_heads=none under torchrun")
        exit_modules = exit_heads.attach(model, exit_heads.for_adapter(adapter, cfg.exit_heads, space))
        if tuned is not None:  # copies of peft's frozen norm: they train, in float32 (the optimizer's master)
            exit_modules.float().requires_grad_(True)
    sampler = make_sampler(cfg.sampler, space, cfg.seed, **({"k": cfg.sampler_k} if cfg.sampler == "random-k" else
                                                           {"n_random": cfg.sampler_k} if cfg.sampler == "sandwich" else {}))
    # `auto` is settled here, once: train_config.yaml and the index record the template the run used.
    cfg = cfg.model_copy(update={"template": resolve_template(cfg.template, tokenizer)})
    records = load_records(cfg.data, cfg.rows, cfg.data_subset, cfg.data_split, cfg.data_columns)
    examples = tokenize_records(records, tokenizer, cfg.max_length, cfg.template)
    pool = tokenize_records(load_records(cfg.mix_data, cfg.mix_rows), tokenizer, cfg.max_length, cfg.template) \
        if cfg.mix_data else []
    unpacked = examples  # importance calibration reads plain rows
    if cfg.packing:  # labelled and mixed-in rows are packed apart, so mix_ratio still counts rows of each
        examples, pool = pack(examples, cfg.max_length), pack(pool, cfg.max_length) if pool else []
    labelled = len(examples)
    examples += pool  # indices [labelled, labelled + len(pool)) are the mixed-in records
    pool_per_epoch = mixed_count(labelled, len(pool), cfg.mix_ratio) if pool else 0
    epoch_size = (0 if pool and cfg.mix_ratio == 1 else labelled) + pool_per_epoch

    per_step = cfg.batch_size * cfg.grad_accum * rt.world
    steps_per_epoch = epoch_size // per_step
    if steps_per_epoch == 0:
        raise ManyinoneError(f"{epoch_size} examples < batch_size*grad_accum={per_step}; lower the batch size")
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)

    (rt.shard(model) if rt.distributed else model.to(device)).train()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # The decoder layers, for the levers that act per layer (None when none does).
    layers = adapter.decoder_stack().layers if cfg.segment_lr_scales or cfg.layer_dropout or cfg.compile_layers \
        else None
    if cfg.compile_layers:
        # The layer's forward only, not its __call__: the exit-capture and layer-dropout hooks come and
        # go every step and would otherwise be guards that force a recompile.
        for layer in layers:
            layer.forward = torch.compile(layer.forward)
    optimizer = make_optimizer(cfg.optimizer, _param_groups(model, exit_modules, cfg, layers), cfg.lr, cfg.weight_decay,
                               device)
    _check_same_run(output, cfg)
    save = functools.partial(distributed.save_state, rt) if rt.distributed else \
        functools.partial(save_state, trainable_only=tuned is not None)
    start = distributed.restore_state(rt, output, model, optimizer) if rt.distributed else restore_state(output, model, optimizer)
    if start:
        print(f"resuming from step {start} ({output / CHECKPOINTS})", file=sys.stderr, flush=True)
    elif cfg.reorder and {"width", "heads"} & set(cfg.axes):
        # Prefixes must hold the most important units before any width is trained (a resumed run
        # restores the already permuted weights instead).
        calibration = [collate(unpacked[i:i + cfg.batch_size], tokenizer.pad_token_id)
                       for i in range(0, min(len(unpacked), cfg.calibration_batches * cfg.batch_size), cfg.batch_size)]
        reorder_by_importance(adapter, [(b["input_ids"].to(device), b["attention_mask"].to(device)) for b in calibration],
                              show_progress=show_progress)
    try:  # an unwritable output fails here, before any training time is spent
        output.mkdir(parents=True, exist_ok=True)
        write_text_durably(output / "train_config.yaml", yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    except OSError as exc:
        raise write_failure(output, exc) from None

    teacher = teacher_target = None
    if cfg.teacher:
        teacher = Teacher.load(cfg.teacher, tokenizer, cfg.output, device, getattr(torch, cfg.teacher_dtype))
        full = space.full()
        teacher_weights = {s: cfg.teacher_full_weight if s == full else cfg.teacher_weight for s in specs}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    order_cache: dict[int, list[int]] = {}
    on_policy = None
    if cfg.on_policy_ratio > 0:
        if rt.distributed:
            raise ManyinoneError("on_policy_ratio > 0 samples with the unsharded runtime; run on one device "
                                 "(or set on_policy_ratio=0 under torchrun)")
        on_policy = on_policy_sampler(model, tokenizer, cfg.on_policy_tokens, cfg.on_policy_temperature,
                                      cfg.max_length)

    def micro_batch(step: int, micro: int) -> dict[str, torch.Tensor]:
        epoch, within = divmod(step, steps_per_epoch)
        if epoch not in order_cache:
            order_cache.clear()
            order_cache[epoch] = mixed_epoch_order(labelled, len(pool), pool_per_epoch, cfg.mix_ratio, cfg.seed, epoch)
        first = distributed.micro_batch_start(within, micro, cfg.grad_accum, cfg.batch_size, rt.world, rt.rank)
        chosen = [examples[i] for i in order_cache[epoch][first:first + cfg.batch_size]]
        if on_policy is not None:
            chosen = on_policy_batch(chosen, on_policy, cfg.on_policy_ratio, cfg.seed, step, micro, cfg.max_length,
                                     tokenizer.eos_token_id)
        return {k: v.to(device) for k, v in collate(chosen, tokenizer.pad_token_id).items()}

    metrics_file = _metrics_from(output / "metrics.jsonl", start) if rt.is_main else open(os.devnull, "w")
    progress = TrainProgress(total_steps, [s.label for s in specs], enabled=show_progress and rt.is_main)
    reporter = Reporter(cfg.report_to if rt.is_main else [], output, cfg.model_dump(), start)
    # SIGTERM/Ctrl-C: save, then exit
    with progress, metrics_file, closing(reporter), deferred_stop_signals() as stop:
        progress.advance_to(start)
        for step in range(start, total_steps):
            started = time.perf_counter()
            torch.manual_seed(cfg.seed * 1_000_003 + step)  # dropout etc. replay exactly after a resume
            lr = lr_at(step, cfg, total_steps)
            for group in optimizer.param_groups:
                set_lr(group, lr * group.get("lr_scale", 1.0))  # runs saved before exit modules have none
            sampled = sampler.sample(step)
            sums: dict[str, float] = {}
            tokens = 0
            teacher_s = on_policy_s = 0.0
            for micro in range(cfg.grad_accum):
                sampled_at = time.perf_counter()
                batch = micro_batch(step, micro)
                on_policy_s += time.perf_counter() - sampled_at  # sampling is most of it when on-policy
                if teacher is not None:  # the teacher's forward is part of the step: timed on its own
                    teacher_started = time.perf_counter()
                    teacher_target = step_parts.teacher_target(teacher, batch, autocast, teacher_weights, cfg)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    teacher_s += time.perf_counter() - teacher_started
                dropout = step_parts.layer_dropout(cfg, layers, step, micro, batch["input_ids"].shape[0])
                with autocast, dropout:
                    # Packed rows pass position_ids (and no mask); plain rows call exactly as before.
                    packed = {"position_ids": batch["position_ids"]} if "position_ids" in batch else {}
                    hidden = adapter.forward_nested(batch["input_ids"], batch.get("attention_mask"), sampled, **packed)
                    out = step_parts.exit_losses(cfg, adapter, space, exit_modules, weights, hidden, batch["labels"],
                                       teacher_target, step, micro)
                (out.total / cfg.grad_accum).backward()
                tokens += batch_tokens(batch)
                step_parts.add_to_sums(sums, out, cfg.grad_accum)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - started
            sums["_stop"] = float(bool(stop))  # every rank must agree to stop at the same step
            sums, tokens = rt.mean(sums), rt.total(tokens)  # over ranks
            if sums.pop("_stop") > 0 and not stop:
                stop.signum = signal.SIGTERM  # another rank was signalled (torchrun forwards SIGTERM)
            record = {"step": step + 1, "epoch": (step + 1) / steps_per_epoch, "lr": lr, **sums,
                      "grad_norm": distributed.scalar(grad_norm), "tokens": tokens, "step_time_s": elapsed,
                      "tokens_per_s": tokens / elapsed, **({"teacher_s": teacher_s} if teacher is not None else {}),
                      **({"on_policy_s": on_policy_s} if on_policy is not None else {})}
            if device.type == "cuda":
                record["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            reporter.log(record)
            progress.update(step + 1, record)
            periodic = cfg.save_every and (step + 1) % cfg.save_every == 0
            if (periodic or stop) and step + 1 < total_steps:
                saved = save(output, step + 1, model, optimizer, cfg.keep_checkpoints)
                if stop:
                    raise stop.interrupted(step + 1, saved)
    metrics_file.close()

    model.eval()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    record = {"model": cfg.model, "data": cfg.data, "rows": cfg.rows, "template": cfg.template, "steps": total_steps}
    with deferred_stop_signals():  # the run is done: a stop signal now waits for these two saves
        if tuned is not None:
            # The resumable state first (it needs the adapters unmerged), then the adapters are folded
            # into the base: the checkpoint is a plain HF model every reader already serves.
            save(output, total_steps, model, optimizer, cfg.keep_checkpoints)
            with exit_heads.detached(model) as trained_heads:
                model = lora.merge(tuned)
            if trained_heads is not None:
                exit_heads.attach(model, trained_heads)
            record["tuning"] = lora.describe(cfg.lora)
        index = build_index(adapter, space, metric=cfg.cost_metric, train=record)
        final = (distributed.unsharded_copy(rt, model, lambda: load_pretrained(cfg.model, dtype=dtype)[0]) if rt.distributed
                 else model.to("cpu"))
        if rt.is_main:
            with exit_heads.detached(final) as trained_heads:
                save_checkpoint(final, tokenizer, index, output, merge=True, exit_heads=trained_heads)
        if tuned is None:
            save(output, total_steps, model, optimizer, cfg.keep_checkpoints)
    rt.close()
    return output
