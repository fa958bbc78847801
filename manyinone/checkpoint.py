"""The manyinone checkpoint: a plain HF folder whose safetensors metadata indexes every budget.

Layout (all written atomically: a temp folder, then one rename):
    config.json, tokenizer files   as `save_pretrained` writes them
    model.safetensors              every tensor once; metadata["manyinone"] = the budget index
    manyinone.json                 the same index, readable without opening the weights

`AutoModelForCausalLM.from_pretrained(folder)` loads the full model with no manyinone code;
`manyinone.load(folder, budget=b)` serves the sub-model that fits budget b.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_model
from torch import nn

from manyinone.adapter import ModelAdapter
from manyinone.budget import METRICS, resolve_budget
from manyinone.dims import NestedSpace, SubnetSpec
from manyinone.errors import ManyinoneError, first_line, resource_error
from manyinone.integrity import (CHECKSUMS_FILE, finish_replace, fsync_dir, in_use, is_write_failure, lock_folder,
                                 verify_checksums, write_checksums, write_failure)

INDEX_FILE, WEIGHTS_FILE, FORMAT = "manyinone.json", "model.safetensors", "manyinone/1"


# Resumable training state inside a run folder: checkpoints/step-NNNNNNN/, complete once state.json
# is in it. One layout for single-process (train.py) and torchrun (distributed.py) runs.
CHECKPOINTS = "checkpoints"


def resume_dir(output: Path, step: int) -> Path:
    return output / CHECKPOINTS / f"step-{step:07d}"


def complete_resume_dirs(output: Path) -> list[Path]:
    """The complete resumable checkpoints under run folder `output`, oldest first."""
    root = output / CHECKPOINTS
    done = [p for p in root.glob("step-*") if (p / "state.json").is_file()] if root.is_dir() else []
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


@contextmanager
def atomic_dir(target: str | os.PathLike, merge: bool = False, checksums: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `target`; on success it replaces `target` in one rename.

    With `merge`, files are instead renamed one by one into an existing `target` (a training run
    folder that also holds logs), the budget index last, so a reader never sees an index whose
    weights are not in place yet. On any error the temp folder is removed and `target` untouched;
    a failed write (disk full, unwritable folder) raises OutputWriteError naming `target`.
    With `checksums`, every file written is listed with its sha256 in `checksums.json` (`integrity`).
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _recover_interrupted_write(target)
        write_id = uuid.uuid4().hex[:8]
        tmp = target.parent / f".{target.name}.tmp-{write_id}"
        tmp.mkdir()
        held = lock_folder(tmp)  # tells readers' recovery that this write is alive
    except OSError as exc:
        raise write_failure(target, exc) from None
    try:
        yield tmp
        if checksums:
            write_checksums(tmp)  # sizes + sha256 of everything written, each file fsync'ed
        if merge:
            target.mkdir(exist_ok=True)
            for item in sorted(tmp.iterdir(), key=lambda p: p.name == INDEX_FILE):
                os.replace(item, target / item.name)
            tmp.rmdir()
            fsync_dir(target)
        elif target.exists():
            old = target.parent / f".{target.name}.old-{write_id}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(exc, ManyinoneError) and is_write_failure(exc):
            raise write_failure(target, exc) from None
        raise
    finally:
        os.close(held)


def _recover_interrupted_write(target: Path) -> None:
    """Undo what a write of `target` killed mid-way (SIGKILL, power loss) left beside it.

    `.NAME.tmp-ID` is an unfinished write: removed. `.NAME.old-ID` is the previous content, moved
    aside by a write that died before its second rename: put back if `target` is gone, else removed.
    A write still running in another process (its temp folder locked) is left alone.
    """
    name = glob.escape(target.name)
    for stale in target.parent.glob(f".{name}.tmp-*"):
        if not in_use(stale):
            shutil.rmtree(stale, ignore_errors=True)
    for old in target.parent.glob(f".{name}.old-*"):
        writer = target.parent / f".{target.name}.tmp-{old.name.rpartition('.old-')[2]}"
        if in_use(writer):  # between a live write's two renames
            continue
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(old, target)
            except OSError:  # the live write's second rename came first
                if not target.exists():
                    raise


def recover_interrupted(path: str | os.PathLike) -> None:
    """Repair what a killed write left at checkpoint folder `path` (an export's temp or moved-aside
    folder beside it, a half-applied `store_choice` inside it). Every reader calls it first; on a
    read-only copy it changes nothing and the reader sees what is there."""
    target = Path(path)
    try:
        _recover_interrupted_write(target)
        if target.is_dir():
            finish_replace(target)
    except OSError:
        pass


def is_checkpoint(folder: Path) -> bool:
    """Whether `folder` is one manyinone wrote: a budget index (manyinone.json or the weights' metadata)
    or a checksums.json. A plain HF model folder is not."""
    if (folder / INDEX_FILE).is_file() or (folder / CHECKSUMS_FILE).is_file():
        return True
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        return False
    try:
        with safe_open(str(weights), framework="pt") as f:
            return "manyinone" in (f.metadata() or {})
    except Exception:  # a damaged header (safetensors' own error type): the load that follows names it
        return False


def verify_checkpoint(folder: str | os.PathLike, what: str = "checkpoint") -> None:
    """The one checksum policy: a manyinone checkpoint must carry a checksums.json that lists every file
    loaders read, and all of them must match (else ManyinoneError naming the file); a plain HF folder,
    which never had one, has nothing to verify."""
    if is_checkpoint(Path(folder)):
        verify_checksums(folder, what)


def build_index(adapter: ModelAdapter, space: NestedSpace, metric: str = "flops", context: int = 512,
                **extra: Any) -> dict[str, Any]:
    """The budget index: every spec of `space` with its absolute and relative cost."""
    if metric not in METRICS:
        raise ManyinoneError(f"cost metric {metric!r} unknown; allowed {list(METRICS)}")
    full = adapter.cost(space.full(), context)
    specs = []
    for spec in space.specs():
        cost = adapter.cost(spec, context)
        specs.append({"spec": spec.to_dict(), **cost.to_dict(), "relative": cost.relative_to(full)})
    return {"format": FORMAT, "adapter": adapter.name, "model_type": adapter.model.config.model_type,
            "space": space.to_dict(), "metric": metric, "context": context, "specs": specs, **extra}


def spec_costs(index: dict[str, Any]) -> dict[SubnetSpec, float]:
    """spec -> relative cost under the index's metric."""
    return {SubnetSpec(e["spec"]): e["relative"][index["metric"]] for e in index["specs"]}


def resolve(index: dict[str, Any], budget: float | None) -> SubnetSpec:
    return resolve_budget(spec_costs(index), budget)


def save_checkpoint(model: nn.Module, tokenizer, index: dict[str, Any], out: str | os.PathLike,
                    merge: bool = False, exit_heads=None, write_extra=None) -> Path:
    """Write `model` (+ tokenizer) as an HF folder carrying `index`, atomically (see `atomic_dir`).

    `exit_heads` (a manyinone.exit_heads.ExitHeads) are written beside the weights and recorded
    in the index; plain transformers ignores them and loads the full model. `write_extra(folder)`
    adds more files (a router) inside the same atomic write, so the checksums cover them too.
    """
    with atomic_dir(out, merge=merge, checksums=True) as tmp:
        # The index records exit modules exactly when this write stores them (a source's entry
        # never outlives them: an export folds them in, an --all export writes them again).
        index = {k: v for k, v in index.items() if k != "exit_heads"}
        if exit_heads is not None:
            index["exit_heads"] = exit_heads.save(tmp)
        if write_extra is not None:
            write_extra(tmp)
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        # save_model stores tied tensors (embeddings / LM head) once; transformers re-ties on load.
        save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "manyinone": json.dumps(index)})
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return Path(out)


def read_index(path: str | os.PathLike) -> dict[str, Any]:
    """The budget index of a checkpoint folder, from manyinone.json or the safetensors metadata."""
    folder = Path(path)
    recover_interrupted(folder)
    if folder.exists() and not folder.is_dir():
        raise ManyinoneError(f"checkpoint {str(path)!r} is a file; expected a folder written by manyinone")
    if not folder.is_dir():
        raise ManyinoneError(f"checkpoint {str(path)!r} not found (expected a folder written by manyinone)")
    index_file, weights = folder / INDEX_FILE, folder / WEIGHTS_FILE
    try:
        if index_file.is_file():
            index = json.loads(index_file.read_text())
        elif weights.is_file():
            with safe_open(str(weights), framework="pt") as f:
                index = json.loads((f.metadata() or {})["manyinone"])
        else:
            raise ManyinoneError(f"{str(path)!r} is not a manyinone checkpoint: no {INDEX_FILE} or {WEIGHTS_FILE}")
    except ManyinoneError:
        raise
    except (ValueError, KeyError, OSError, RecursionError) as exc:  # ValueError: bad JSON or UTF-8
        raise ManyinoneError(f"checkpoint {str(path)!r} is corrupt: cannot read its budget index ({type(exc).__name__})") from None
    except Exception as exc:  # safetensors raises its own error type for a damaged header
        if isinstance(exc, ManyinoneError):
            raise
        raise resource_error(exc, f"reading {WEIGHTS_FILE}'s header") or ManyinoneError(
            f"checkpoint {str(path)!r} is corrupt: {WEIGHTS_FILE} unreadable ({first_line(exc)})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ManyinoneError(f"checkpoint {str(path)!r} has an index of unknown format; expected {FORMAT!r}")
    missing = [k for k in ("adapter", "model_type", "space", "metric", "specs") if k not in index]
    specs_ok = isinstance(index.get("specs"), list) and all(
        isinstance(e, dict) and isinstance(e.get("spec"), dict) and isinstance(e.get("relative"), dict)
        and index.get("metric") in e["relative"] for e in index["specs"])
    if missing or not specs_ok:
        raise ManyinoneError(f"checkpoint {str(path)!r} is corrupt: budget index lacks {missing or ['valid specs']}")
    return index
