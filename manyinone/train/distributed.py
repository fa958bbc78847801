"""Training on several GPUs (or CPU processes) under torchrun: FSDP2 sharding, DCP save/resume.

The only module in manyinone that calls torch.distributed. `Runtime.from_env()` reads torchrun's
environment (WORLD_SIZE, RANK, LOCAL_RANK); with WORLD_SIZE unset or 1 it is the single-process
runtime and train.py takes its usual path. With several processes:

* every decoder layer is its own FSDP2 unit (`fully_shard`), the model root holds embeddings, final
  norm and LM head; parameters keep the dtype they were loaded in, bf16 autocast runs on top, so
  the math matches one GPU;
* each optimizer step consumes batch_size * grad_accum * world examples; rank r takes every
  world-th micro-batch, so N GPUs at grad_accum g see the same micro-batches, in the same
  optimizer steps, as one GPU at grad_accum g * N;
* resumable state is a torch distributed checkpoint (each rank writes its shards; any world size
  can load it); the final HF checkpoint is gathered on rank 0, which alone writes logs.

Example: `torchrun --nproc-per-node 2 -m manyinone train --model ... --exits 8,16,24,32 ...`
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from manyinone.io.checkpoint import complete_resume_dirs, read_resume_state, resume_corrupt, resume_dir
from manyinone.io.durable import publish_dir, write_checksums
from manyinone.core.errors import ManyinoneError


def world_size_from_env() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ManyinoneError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a whole number") from None


def refuse_unsupported(rt: "Runtime", cfg) -> None:
    """Under torchrun, the settings a sharded run does not support fail before any weights load."""
    if not rt.distributed:
        return
    if cfg.lora is not None:
        raise ManyinoneError("lora runs on one device only (it fits a 13B model on one GPU); drop torchrun, or "
                             "use lora=null for a sharded full fine-tune")
    if {"width", "heads"} & set(cfg.axes):
        raise ManyinoneError(f"axes {cfg.axes} train on one device only (width/heads slice unsharded weights); "
                             "use axes=[depth] under torchrun")
    if cfg.on_policy_ratio > 0:
        raise ManyinoneError("on_policy_ratio > 0 samples with the unsharded runtime; run on one device "
                             "(or set on_policy_ratio=0 under torchrun)")


def micro_batch_start(step_in_epoch: int, micro: int, grad_accum: int, batch_size: int, world: int, rank: int) -> int:
    """Index into the epoch's example order of this rank's micro-batch (pure; 1 GPU: world=1, rank=0)."""
    return ((step_in_epoch * grad_accum + micro) * world + rank) * batch_size


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: HF models name their class in `_no_split_modules`."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ManyinoneError(f"{type(model).__name__} names no decoder layer class (_no_split_modules={sorted(names)}); "
                             "cannot shard it with FSDP2")
    return layers


@dataclass
class Runtime:
    """Rank, world size and device mesh of this process; world 1 means no torch.distributed at all."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    mesh: Any = field(default=None, repr=False)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Runtime":
        world = world_size_from_env()
        if world <= 1:
            return cls()
        return cls(rank=int(os.environ["RANK"]), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))

    # --- setup and teardown -----------------------------------------------------------------
    def device(self, name: str) -> torch.device:
        """This rank's device: cuda:LOCAL_RANK (NCCL) when CUDA is asked for or available, else cpu (gloo)."""
        cuda = name.startswith("cuda") or (name == "auto" and torch.cuda.is_available())
        if name not in ("auto", "cpu") and not name.startswith("cuda"):
            raise ManyinoneError(f"device {name!r} unknown under torchrun; allowed auto, cpu, cuda")
        if cuda and not torch.cuda.is_available():
            raise ManyinoneError(f"device {name!r} requested but CUDA is not available; use cpu or auto")
        device = torch.device("cuda", self.local_rank) if cuda else torch.device("cpu")
        if not dist.is_initialized():
            if cuda:
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
            from torch.distributed.device_mesh import init_device_mesh

            self.mesh = init_device_mesh(device.type, (self.world,))
        return device

    def shard(self, model: nn.Module) -> nn.Module:
        """FSDP2 in place: one unit per decoder layer, then the root; shards land on the mesh's device.
        A model `load_sharded` made is already sharded and is returned as it is."""
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(model, FSDPModule):
            return model
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=self.mesh)
        fully_shard(model, mesh=self.mesh)
        return model

    def load_sharded(self, source: str, dtype: torch.dtype, device: torch.device) -> nn.Module | None:
        """The model of `source`, sharded like `shard` and filled by each rank reading only its own
        rows of the safetensors files, so that no rank ever holds the whole model (CPU or GPU).

        How: parameters are built on the meta device (`loading.build_empty`), sharded, given
        uninitialised memory for their shards alone (`to_empty`), then filled by torch distributed
        checkpoint's HuggingFaceStorageReader, which reads each shard's slice of each tensor. The
        buffers (rotary frequencies) are the constructor's own. None where this path cannot serve
        (a GGUF file, a hub name, other weight files, names that differ from the module's, torch
        older than 2.8): the caller then loads the whole model and shards it."""
        try:
            from torch.distributed.checkpoint import HuggingFaceStorageReader
        except ImportError:
            return None
        import torch.distributed.checkpoint as dcp

        from manyinone.io.checkpoint import verify_checkpoint
        from manyinone.io.loading import build_empty, load_failure, resolve_source, safetensors_names

        src = resolve_source(source)
        if src.gguf_file or src.is_hub:
            return None
        verify_checkpoint(src.folder)  # a manyinone checkpoint as the base model is checked like any other
        try:
            stored = safetensors_names(src)
        except Exception as exc:  # a damaged header
            raise load_failure(src, exc) from None
        if not stored:
            return None
        model = build_empty(src, dtype)
        covered = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if n in stored}
        if any(id(p) not in covered for p in model.parameters()):  # transformers renames such keys itself
            return None
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        self.shard(model)
        model.to_empty(device=device)  # each rank allocates its own shards only
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(buffers[n])
        state = {k: v for k, v in model.state_dict().items() if k in stored}
        try:
            dcp.load(state, storage_reader=HuggingFaceStorageReader(src.folder))
        except Exception as exc:  # a damaged file, or memory: said as what it is
            raise load_failure(src, exc) from None
        return model

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    # --- logging ---------------------------------------------------------------------------
    def mean(self, values: Mapping[str, float]) -> dict[str, float]:
        """Per-rank numbers averaged over ranks (one all-reduce); identity on one process."""
        if not self.distributed or not values:
            return dict(values)
        keys = sorted(values)
        device = torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
        packed = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)  # [metrics]
        dist.all_reduce(packed)  # SUM: gloo has no AVG
        return {k: float(v) / self.world for k, v in zip(keys, packed.tolist())}

    def total(self, value: int) -> int:
        return int(round(self.mean({"v": value})["v"] * self.world))


def scalar(value: Any) -> float:
    """A float from a tensor that may be a DTensor (FSDP2's clip_grad_norm_ returns one)."""
    full = getattr(value, "full_tensor", None)
    return float(full() if full is not None else value)


# --- resumable state: torch distributed checkpoint ------------------------------------------------
def save_state(rt: Runtime, output: Path, step: int, model: nn.Module, optimizer, keep: int) -> Path:
    """Every rank writes its shards into one temp folder; rank 0 then marks it complete and renames it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    target = resume_dir(output, step)
    tmp = target.parent / f".{target.name}.tmp-dcp"  # one name all ranks agree on
    if rt.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    rt.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
    rt.barrier()
    if rt.is_main:
        (tmp / "state.json").write_text(json.dumps({"step": step, "format": "dcp", "world": rt.world}))
        write_checksums(tmp)  # sizes + sha256 of the shards and state.json, each fsync'ed
        publish_dir(tmp, target)  # one rename (old state moved aside first), then fsync of the folder
        for old in complete_resume_dirs(output)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    rt.barrier()
    return target


def restore_state(rt: Runtime, output: Path, model: nn.Module, optimizer) -> int:
    """Load the newest complete distributed checkpoint under `output`; returns the next step (0 if none)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    dirs = complete_resume_dirs(output)
    if not dirs:
        return 0
    last = dirs[-1]
    meta = read_resume_state(last)  # checksums verified; a damaged state.json is a clean error
    if meta.get("format") != "dcp":
        raise ManyinoneError(f"resume checkpoint {str(last)!r} was written by a single-process run; "
                             "resume it without torchrun (or start a new --output)")
    if meta.get("world") != rt.world:
        # The data order and the number of steps depend on the world size: resuming on another
        # number of GPUs would silently change the run.
        raise ManyinoneError(f"resume checkpoint {str(last)!r} was written by {meta.get('world')} processes; "
                             f"resume with torchrun --nproc-per-node {meta.get('world')} (or start a new --output)")
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    try:
        dcp.load(state, checkpoint_id=str(last))
    except Exception as exc:
        raise resume_corrupt(last, exc) from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return meta["step"]


def unsharded_copy(rt: Runtime, model: nn.Module, build: Callable[[], nn.Module]) -> nn.Module | None:
    """On rank 0, a plain CPU model holding the sharded model's full weights; None elsewhere.

    Every rank must call it: the weights are all-gathered shard by shard into rank 0's CPU memory.
    `build` gives the model's skeleton with its parameters on the meta device (`loading.build_empty`):
    the gathered tensors become its parameters, so rank 0 holds one copy of the weights, not two.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not rt.is_main:
        return None
    plain = build()
    plain.load_state_dict(full, assign=True)
    plain.tie_weights()  # assign gives a tied head its own tensor: tie it to the embedding again
    return plain.eval()
