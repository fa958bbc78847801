"""Export a trained checkpoint: one budget as a plain HF model, or all budgets in one file."""

from __future__ import annotations

import os
from pathlib import Path

from manyinone.io.api import open_checkpoint
from manyinone.io.checkpoint import read_index, resolve, save_checkpoint
from manyinone.core.errors import ManyinoneError


def _refuse_overwriting_source(ckpt: str | os.PathLike, output: str | os.PathLike) -> None:
    if Path(output).resolve() == Path(ckpt).resolve():
        raise ManyinoneError(f"--output {str(output)!r} is the checkpoint being exported; choose another folder")


def export_budget(ckpt: str | os.PathLike, budget: float, output: str | os.PathLike) -> Path:
    """Write the sub-model fitting `budget` as a standalone HF checkpoint plain transformers loads.

    manyinone.json beside it records the spec and its cost relative to the full model.
    """
    _refuse_overwriting_source(ckpt, output)
    spec = resolve(read_index(ckpt), budget)  # a bad budget fails before any weights load
    nested = open_checkpoint(ckpt)
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
    return save_checkpoint(sub, nested.tokenizer, index, output)


def export_all(ckpt: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Write one budget-indexed checkpoint (each tensor once) that `manyinone.load(output, budget=b)` serves."""
    _refuse_overwriting_source(ckpt, output)
    nested = open_checkpoint(ckpt)
    return save_checkpoint(nested.model, nested.tokenizer, nested.index, output, exit_heads=nested.exit_heads)
