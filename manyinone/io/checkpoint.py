"""The manyinone checkpoint: a plain HF folder whose safetensors metadata indexes every budget.

Layout (all written atomically: a temp folder, then one rename):
    config.json, tokenizer files   as `save_pretrained` writes them (config.json names `architectures`)
    model.safetensors              every tensor once; metadata["manyinone"] = the budget index
    manyinone.json                 the same index, readable without opening the weights

Weights above `max_shard_size` (5 GB by default; the Hub refuses files over 50 GB) are written as
HF's sharded layout instead of model.safetensors: model-0000k-of-0000n.safetensors plus
model.safetensors.index.json, whose "metadata" carries the budget index.

`AutoModelForCausalLM.from_pretrained(folder)` loads the full model with no manyinone code;
`manyinone.load(folder, budget=b)` serves the sub-model that fits budget b.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Collection
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file, save_model
from torch import nn

from manyinone.core.adapter import ModelAdapter
from manyinone.core.cost import METRICS
from manyinone.core.space import NestedSpace, SubnetSpec
from manyinone.core.errors import ManyinoneError, first_line, resource_error
from manyinone.io.durable import atomic_dir, recover_interrupted_write
from manyinone.io.compat import make_floor_compatible
from manyinone.io.integrity import CHECKSUMS_FILE, verify_checksums
from manyinone.core.index import FORMAT, BudgetIndex, dumps_index, parse_index

INDEX_FILE, WEIGHTS_FILE = "manyinone.json", "model.safetensors"
SHARD_INDEX_FILE = "model.safetensors.index.json"  # HF's name for a sharded checkpoint's weight map
MAX_SHARD_SIZE = "5GB"  # what transformers and the Hub have long used; any file stays far under 50 GB


# Resumable training state inside a run folder: checkpoints/step-NNNNNNN/, complete once state.json
# is in it. One layout for single-process (train.py) and torchrun (distributed.py) runs.
CHECKPOINTS = "checkpoints"


def resume_dir(output: Path, step: int) -> Path:
    return output / CHECKPOINTS / f"step-{step:07d}"


def resume_corrupt(folder: Path, exc: BaseException) -> ManyinoneError:
    """The one error for an unreadable resume folder; running out of memory is not corruption."""
    return resource_error(exc, f"loading resume checkpoint {str(folder)!r}") or ManyinoneError(f"resume checkpoint {str(folder)!r} is corrupt ({type(exc).__name__}); "
                          "delete it to resume from an earlier one")


def read_resume_state(folder: Path) -> dict[str, Any]:
    """The checked state.json of resume folder `folder` (checksums verified first): {"step": int, ...}.

    A damaged folder or state.json is a one-line ManyinoneError saying to delete it, never a raw
    JSONDecodeError; single-process (train.py) and torchrun (distributed.py) resumes both read here.
    """
    try:
        verify_checksums(folder, "resume checkpoint")
    except ManyinoneError as exc:
        raise ManyinoneError(f"{exc}; delete it to resume from an earlier one") from None
    try:
        state = json.loads((folder / "state.json").read_text())
        state["step"] = int(state["step"])
    except Exception as exc:
        raise resume_corrupt(folder, exc) from None
    return state


def complete_resume_dirs(output: Path) -> list[Path]:
    """The complete resumable checkpoints under run folder `output`, oldest first."""
    root = output / CHECKPOINTS
    done = [p for p in root.glob("step-*") if (p / "state.json").is_file()] if root.is_dir() else []
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def recover_interrupted(path: str | os.PathLike) -> None:
    """Repair what a killed write left at checkpoint folder `path`: an export's (or `rewrite_index`'s)
    temp or moved-aside folder beside it. Every reader calls it first; a live writer's folders are
    left alone, and on a read-only copy it changes nothing and the reader sees what is there."""
    try:
        recover_interrupted_write(Path(path))
    except OSError:
        pass


def is_checkpoint(folder: Path) -> bool:
    """Whether `folder` is one manyinone wrote: a budget index (manyinone.json or the weights' metadata)
    or a checksums.json. A plain HF model folder is not."""
    if (folder / INDEX_FILE).is_file() or (folder / CHECKSUMS_FILE).is_file():
        return True
    if (folder / SHARD_INDEX_FILE).is_file():
        try:
            return "manyinone" in json.loads((folder / SHARD_INDEX_FILE).read_text()).get("metadata", {})
        except (OSError, ValueError, AttributeError, RecursionError):
            return False
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        return False
    try:
        with safe_open(str(weights), framework="pt") as f:
            return "manyinone" in (f.metadata() or {})
    except Exception:  # a damaged header (safetensors' own error type): the load that follows names it
        return False


def verify_checkpoint(folder: str | os.PathLike, what: str = "checkpoint", full: bool = False) -> None:
    """The one checksum policy: a manyinone checkpoint must carry a checksums.json that lists every file
    loaders read, and all of them must match (else ManyinoneError naming the file); a plain HF folder,
    which never had one, has nothing to verify. Opening checks fast (sizes, small files hashed:
    `integrity`); `full` hashes every byte (export, `manyinone verify`)."""
    if is_checkpoint(Path(folder)):
        verify_checksums(folder, what, full=full)


def build_index(adapter: ModelAdapter, space: NestedSpace, metric: str = "flops", context: int = 512,
                one_more_layer: Collection[SubnetSpec] = (), **extra: Any) -> dict[str, Any]:
    """The budget index: every spec of `space` with its absolute and relative cost. `one_more_layer`:
    depth exits that run one decoder layer more than their depth (an exit block, which the export
    appends as a whole layer): costed as that deeper depth, so a budget stays an upper bound."""
    if metric not in METRICS:
        raise ManyinoneError(f"cost metric {metric!r} unknown; allowed {list(METRICS)}")
    full = adapter.cost(space.full(), context)
    specs = []
    for spec in space.specs():
        costed = SubnetSpec(depth=spec["depth"] + 1) if spec in one_more_layer else spec
        cost = adapter.cost(costed, context)
        specs.append({"spec": spec.to_dict(), **cost.to_dict(), "relative": cost.relative_to(full)})
    return {"format": FORMAT, "adapter": adapter.name, "model_type": adapter.model.config.model_type,
            "space": space.to_dict(), "metric": metric, "context": context, "specs": specs, **extra}


def load_index(path: str | os.PathLike) -> BudgetIndex:
    """The one reader: the typed budget index of a checkpoint folder (manyinone.json, else the copy
    in the safetensors metadata; the one writer keeps both identical). Every problem is one line."""
    folder = Path(path)
    source = f"checkpoint {str(path)!r}"
    recover_interrupted(folder)
    if folder.exists() and not folder.is_dir():
        raise ManyinoneError(f"{source} is a file; expected a folder written by manyinone")
    if not folder.is_dir():
        raise ManyinoneError(f"{source} not found (expected a folder written by manyinone)")
    index_file, weights, shards = folder / INDEX_FILE, folder / WEIGHTS_FILE, folder / SHARD_INDEX_FILE
    try:
        if index_file.is_file():
            raw = json.loads(index_file.read_text())
        elif shards.is_file():
            raw = json.loads(json.loads(shards.read_text())["metadata"]["manyinone"])
        elif weights.is_file():
            with safe_open(str(weights), framework="pt") as f:
                raw = json.loads((f.metadata() or {})["manyinone"])
        else:
            raise ManyinoneError(f"{str(path)!r} is not a manyinone checkpoint: no {INDEX_FILE} or {WEIGHTS_FILE}")
    except ManyinoneError:
        raise
    except (ValueError, KeyError, OSError, RecursionError) as exc:  # ValueError: bad JSON or UTF-8
        raise ManyinoneError(f"{source} is corrupt: cannot read its budget index ({type(exc).__name__})") from None
    except Exception as exc:  # safetensors raises its own error type for a damaged header
        raise resource_error(exc, f"reading {WEIGHTS_FILE}'s header") or ManyinoneError(
            f"{source} is corrupt: {WEIGHTS_FILE} unreadable ({first_line(exc)})") from None
    return parse_index(raw, source)


def read_index(path: str | os.PathLike) -> dict[str, Any]:
    """`load_index` as the plain dict stored on disk (validated), for callers that read it as JSON."""
    return load_index(path).to_dict()


def _typed(index: BudgetIndex | dict[str, Any]) -> BudgetIndex:
    return index if isinstance(index, BudgetIndex) else parse_index(index, "budget index")


def spec_costs(index: BudgetIndex | dict[str, Any]) -> dict[SubnetSpec, float]:
    """spec -> relative cost under the index's metric."""
    return _typed(index).spec_costs()


def resolve(index: BudgetIndex | dict[str, Any], budget: float | None) -> SubnetSpec:
    return _typed(index).resolve(budget)


def routed_plan(index: BudgetIndex | dict[str, Any], budget: float | None):
    """The stored per-layer plan (one SubnetSpec per layer) of the largest relative cost within `budget`
    (BudgetIndex.routed_plan)."""
    return _typed(index).routed_plan(budget)


def save_checkpoint(model: nn.Module, tokenizer, index: dict[str, Any], out: str | os.PathLike,
                    merge: bool = False, exit_heads=None, write_extra=None,
                    max_shard_size: int | str = MAX_SHARD_SIZE) -> Path:
    """Write `model` (+ tokenizer) as an HF folder carrying `index`, atomically (see `atomic_dir`).

    `exit_heads` (a manyinone.train.exit_heads.ExitHeads) are written beside the weights and recorded
    in the index; plain transformers ignores them and loads the full model. `write_extra(folder)`
    adds more files (a router) inside the same atomic write, so the checksums cover them too.
    Weights larger than `max_shard_size` (bytes, or "5GB") are sharded the way transformers shards.
    """
    parse_index(index, "budget index being written")  # a bad index fails before anything is written
    with atomic_dir(out, merge=merge, checksums=True) as tmp:
        # The index records exit modules exactly when this write stores them (a source's entry
        # never outlives them: an export folds them in, an --all export writes them again).
        index = {k: v for k, v in index.items() if k != "exit_heads"}
        if exit_heads is not None:
            index["exit_heads"] = exit_heads.save(tmp)
        if write_extra is not None:
            write_extra(tmp)
        # transformers records the class in save_pretrained; configs built from code or GGUF lack it,
        # and vLLM and other loaders pick the model class from `architectures` alone.
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        make_floor_compatible(tmp)  # transformers 4.56 (the declared floor) reads it as 5.x does
        _write_index_copies(tmp, index, lambda metadata: _write_weights(model, tmp, metadata, max_shard_size))
    return Path(out)


def _unique_tensors(model: nn.Module) -> dict[str, Any]:
    """The state dict with each storage once (tied embeddings / LM head: the first name is kept;
    transformers re-ties on load), contiguous as safetensors requires."""
    seen: set[tuple] = set()
    unique = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            unique[name] = tensor.detach().contiguous()
    return unique


def _write_weights(model: nn.Module, folder: Path, metadata: dict[str, str], max_shard_size: int | str) -> None:
    """model.safetensors (with `metadata`), or HF's shards plus their index (`metadata` in the index)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    state = _unique_tensors(model)
    try:
        split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                                   max_shard_size=max_shard_size)
    except (ValueError, TypeError) as exc:  # a malformed size such as "5 gigs"
        raise ManyinoneError(f"max shard size {max_shard_size!r} unreadable ({first_line(exc)}); "
                             "allowed a byte count or a size like 5GB") from None
    if not split.is_sharded:
        # save_model stores tied tensors (embeddings / LM head) once; transformers re-ties on load.
        save_model(model, str(folder / WEIGHTS_FILE), metadata=metadata)
        return
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state[n] for n in names}, str(folder / filename), metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / SHARD_INDEX_FILE).write_text(json.dumps(
        {"metadata": {"total_size": total, **metadata}, "weight_map": split.tensor_to_filename}, indent=2) + "\n")


def _write_index_copies(folder: Path, index: BudgetIndex | dict[str, Any], write_weights) -> None:
    """The one writer: the index serialised once, into the weights' metadata and manyinone.json alike."""
    text = dumps_index(index)
    write_weights({"format": "pt", "manyinone": text})
    (folder / INDEX_FILE).write_text(json.dumps(json.loads(text), indent=2) + "\n")


def rewrite_index(path: str | os.PathLike, update) -> Path:
    """Change a checkpoint's budget index in place: `update(index dict) -> index dict`.

    Both copies change together in one atomic folder write: the weights file is rewritten with the
    new metadata (tensor bytes copied unchanged), manyinone.json beside it, the other files hard-linked
    (copied where links are unsupported), checksums recomputed. The checkpoint is verified first, so a
    damaged one is never re-blessed; a crash leaves the old checkpoint or the new one.
    """
    folder = Path(path)
    index = update(read_index(folder))  # also undoes what a killed earlier rewrite left
    parse_index(index, "budget index being written")
    verify_checksums(folder)  # a manyinone checkpoint carries a full listing (`verify_checkpoint`)
    with atomic_dir(folder, checksums=True) as tmp:
        for item in folder.iterdir():
            if item.name in (WEIGHTS_FILE, INDEX_FILE, CHECKSUMS_FILE, SHARD_INDEX_FILE):
                continue
            if item.is_dir():
                shutil.copytree(item, tmp / item.name, copy_function=_link_or_copy)
            else:
                _link_or_copy(item, tmp / item.name)
        if (folder / WEIGHTS_FILE).is_file():
            _write_index_copies(tmp, index, lambda metadata: _copy_safetensors(folder / WEIGHTS_FILE, tmp / WEIGHTS_FILE,
                                                                               metadata))
        elif (folder / SHARD_INDEX_FILE).is_file():  # the shards are linked above; only their index changes
            shard_index = json.loads((folder / SHARD_INDEX_FILE).read_text())
            _write_index_copies(tmp, index, lambda metadata: (tmp / SHARD_INDEX_FILE).write_text(json.dumps(
                {**shard_index, "metadata": {**shard_index.get("metadata", {}), **metadata}}, indent=2) + "\n"))
        else:
            (tmp / INDEX_FILE).write_text(json.dumps(json.loads(dumps_index(index)), indent=2) + "\n")
    return folder


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _copy_safetensors(src: Path, dst: Path, metadata: dict[str, str]) -> None:
    """Copy a safetensors file with new header metadata; the tensor bytes are streamed unchanged."""
    with open(src, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        header["__metadata__"] = metadata
        data = json.dumps(header, separators=(",", ":")).encode("utf-8")
        data += b" " * (-len(data) % 8)  # the format pads the header to an 8-byte boundary
        with open(dst, "wb") as out:
            out.write(len(data).to_bytes(8, "little"))
            out.write(data)
            shutil.copyfileobj(f, out, 1 << 20)


def token_routed_budget(index: BudgetIndex | dict[str, Any], budget: float | None):
    """The index's token-routed budget for `budget` (BudgetIndex.token_routed_budget), or None."""
    return _typed(index).token_routed_budget(budget)
