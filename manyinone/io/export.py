"""Export a trained checkpoint: one budget as a plain HF model, or all budgets in one file."""

from __future__ import annotations

import json
import os
from pathlib import Path

from manyinone.io.api import open_checkpoint
import torch

from manyinone.io.checkpoint import MAX_SHARD_SIZE, read_index, recover_interrupted, resolve, save_checkpoint
from manyinone.core.errors import ManyinoneError
from manyinone.core.space import SubnetSpec
from manyinone.io.integrity import CHECKSUMS_FILE
from manyinone.io.model_card import model_card

REPORTS = ("eval.json", "eval.png")  # `manyinone eval` writes these beside an export; stale once it is replaced


def check_export_target(ckpt: str | os.PathLike, output: str | os.PathLike) -> None:
    """Refuse an --output whose replacement would lose anything: the checkpoint itself, a folder holding
    it, a file, or a folder with files an export did not write. A new path, an empty folder or an
    earlier export (every file listed in its checksums.json) is replaced whole."""
    out, src = Path(output), Path(ckpt)
    recover_interrupted(out)  # a killed export's moved-aside folder is the real target
    if out.resolve() == src.resolve():
        raise ManyinoneError(f"--output {str(output)!r} is the checkpoint being exported; choose another folder")
    if src.resolve().is_relative_to(out.resolve()):
        raise ManyinoneError(f"--output {str(output)!r} holds the checkpoint being exported; choose another folder")
    if out.exists() and not out.is_dir():
        raise ManyinoneError(f"--output {str(output)!r} is a file; give a folder for the export")
    if out.is_dir():
        try:
            listed = set(json.loads((out / CHECKSUMS_FILE).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError, RecursionError):
            listed = set()
        foreign = sorted((p.name for p in out.iterdir() if p.name not in {*listed, CHECKSUMS_FILE, *REPORTS}),
                         key=lambda name: (name.startswith("."), name))
        if foreign:
            names = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise ManyinoneError(f"--output {str(output)!r} holds files an export did not write ({names}); "
                                 "choose a new or empty folder, or remove them")


EXPORT_DTYPES = ("float32", "bfloat16", "float16")


def export_dtype(name: str) -> torch.dtype:
    if name not in EXPORT_DTYPES:
        raise ManyinoneError(f"export dtype {name!r} unknown; allowed {', '.join(EXPORT_DTYPES)}")
    return getattr(torch, name)


GGUF_FILE = "model.gguf"


def gguf_name(spec: dict[str, int]) -> str:
    """An --all export's GGUF file of one budget: depth=12 -> model-depth-12.gguf (flat in the folder, so the
    checksums cover it; no '=' in a name that shells and llama.cpp flags take)."""
    return "model-" + "_".join(f"{k}-{v}" for k, v in spec.items()) + ".gguf"


def export_budget(ckpt: str | os.PathLike, budget: float, output: str | os.PathLike, dtype: str = "float32",
                  max_shard_size: int | str = MAX_SHARD_SIZE, gguf: bool = False) -> Path:
    """Write the sub-model fitting `budget` as a standalone HF checkpoint plain transformers loads,
    its weights in `dtype` (bfloat16 halves a 13B export to 26 GB), sharded above `max_shard_size`;
    with `gguf`, also model.gguf for llama.cpp. README.md is its model card.

    manyinone.json beside it records the spec and its cost relative to the full model. The source is
    verified in full (every byte's sha256) first: an export never copies a damaged weight.
    """
    check_export_target(ckpt, output)
    torch_dtype = export_dtype(dtype)
    refuse_token_routed(ckpt, read_index(ckpt), budget)
    spec = resolve(read_index(ckpt), budget)  # a bad budget fails before any weights load
    nested = open_checkpoint(ckpt, dtype=torch_dtype, full_check=True)
    entry = next(e for e in nested.index["specs"] if e["spec"] == spec.to_dict())
    sub = nested.sub_model(spec)  # exit modules, if any, folded into plain HF modules
    # The exported model is its own full model: its space holds only this spec, at relative cost 1.
    exported = {**entry, "relative_to_source": entry["relative"], "relative": {k: 1.0 for k in entry["relative"]}}
    index = {
        # A router's per-layer plans belong to the source's full model (exit modules are folded in).
        **{k: v for k, v in nested.index.items() if k not in ("routed", "router")},
        "space": {axis: {"total": v, "choices": [v]} for axis, v in spec.items()},
        "specs": [exported],
        "exported": {"budget": budget, "spec": spec.to_dict(), "from": str(ckpt)},
    }

    def extra(folder: Path) -> None:
        if gguf:
            from manyinone.io.gguf_out import write_gguf

            write_gguf(sub, nested.tokenizer, folder / GGUF_FILE, torch_dtype)
        (folder / "README.md").write_text(model_card(index, ckpt, exported, [GGUF_FILE] if gguf else None),
                                          encoding="utf-8")

    return save_checkpoint(sub, nested.tokenizer, index, output, max_shard_size=max_shard_size, write_extra=extra)


def refuse_token_routed(ckpt, index: dict, budget: float) -> None:
    """A token-routed budget is refused, not exported: each token picks one of K per-layer plans, and a
    plain HF config holds one architecture for every token. The one model that could stand in for it,
    the widest plan its tokens use, costs more than the budget, so writing it would break the budget
    silently."""
    from manyinone.io.checkpoint import token_routed_budget

    entry = token_routed_budget(index, budget)
    if entry is None:
        return
    widest = max(c for c, u in zip(entry.costs, entry.usage) if u > 0)
    raise ManyinoneError(
        f"budget {budget} of {str(ckpt)!r} is token-routed ({len(entry.plans)} plans chosen per token, average cost "
        f"{entry.average:.3f}); a plain HF model holds one plan for all tokens, and the widest plan its tokens use "
        f"costs {widest:.3f}, over the budget: serve it with `manyinone serve` or manyinone.load, or export a "
        "uniform budget from the checkpoint it was routed from")


def export_all(ckpt: str | os.PathLike, output: str | os.PathLike, dtype: str = "float32",
               max_shard_size: int | str = MAX_SHARD_SIZE, gguf: bool = False) -> Path:
    """Write one budget-indexed checkpoint (each tensor once) that `manyinone.load(output, budget=b)` serves;
    with `gguf`, also model-<spec>.gguf for every budget (each a standalone llama.cpp model)."""
    check_export_target(ckpt, output)
    torch_dtype = export_dtype(dtype)
    nested = open_checkpoint(ckpt, dtype=torch_dtype, full_check=True)
    specs = [SubnetSpec(**e["spec"]) for e in nested.index["specs"]]
    names = [gguf_name(s.to_dict()) for s in specs]

    def extra(folder: Path) -> None:
        if gguf:
            from manyinone.io.gguf_out import write_gguf

            for spec, name in zip(specs, names):
                write_gguf(nested.sub_model(spec), nested.tokenizer, folder / name, torch_dtype)
        (folder / "README.md").write_text(model_card(nested.index, ckpt, None, names if gguf else None),
                                          encoding="utf-8")

    return save_checkpoint(nested.model, nested.tokenizer, nested.index, output, exit_heads=nested.exit_heads,
                           max_shard_size=max_shard_size, write_extra=extra)
