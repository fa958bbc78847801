"""The manyinone checkpoint: a plain HF folder whose safetensors metadata indexes every budget.

Layout (all written atomically: a temp folder, then one rename):
    config.json, tokenizer files   as `save_pretrained` writes them
    model.safetensors              every tensor once; metadata["manyinone"] = the budget index
    manyinone.json                 the same index, readable without opening the weights

`AutoModelForCausalLM.from_pretrained(folder)` loads the full model with no manyinone code;
`manyinone.load(folder, budget=b)` serves the sub-model that fits budget b.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_model
from torch import nn

from manyinone.core.adapter import ModelAdapter
from manyinone.core.cost import METRICS, check_budget, resolve_budget
from manyinone.core.space import NestedSpace, SubnetSpec
from manyinone.core.errors import ManyinoneError
from manyinone.io.durable import atomic_dir

INDEX_FILE, WEIGHTS_FILE, FORMAT = "manyinone.json", "model.safetensors", "manyinone/1"


# Resumable training state inside a run folder: checkpoints/step-NNNNNNN/, complete once state.json
# is in it. One layout for single-process (train.py) and torchrun (distributed.py) runs.
CHECKPOINTS = "checkpoints"


def resume_dir(output: Path, step: int) -> Path:
    return output / CHECKPOINTS / f"step-{step:07d}"


def resume_corrupt(folder: Path, exc: BaseException) -> ManyinoneError:
    return ManyinoneError(f"resume checkpoint {str(folder)!r} is corrupt ({type(exc).__name__}); "
                          "delete it to resume from an earlier one")


def read_resume_state(folder: Path) -> dict[str, Any]:
    """The checked state.json of resume folder `folder` (checksums verified first): {"step": int, ...}.

    A damaged folder or state.json is a one-line ManyinoneError saying to delete it, never a raw
    JSONDecodeError; single-process (train.py) and torchrun (distributed.py) resumes both read here.
    """
    from manyinone.io.integrity import verify_checksums

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


def routed_plan(index: dict, budget: float | None) -> tuple[tuple[int, int], ...] | None:
    """The stored per-layer plan of the largest relative cost within `budget`; None when the index
    holds no routed plans (or budget is None: the full model)."""
    routed = index.get("routed") or []
    if not routed or budget is None:
        return None
    budget = check_budget(budget)
    fitting = [r for r in routed if r["relative"] <= budget + 1e-9]
    if not fitting:
        low = min(r["relative"] for r in routed)
        raise ManyinoneError(f"budget {budget} is below the smallest routed plan (cost {low:.3f}); allowed {low:.3f} <= budget <= 1")
    best = max(fitting, key=lambda r: (r["relative"], r["budget"]))
    return tuple(tuple(o) for o in best["plan"])


def save_checkpoint(model: nn.Module, tokenizer, index: dict[str, Any], out: str | os.PathLike,
                    merge: bool = False, exit_heads=None, write_extra=None) -> Path:
    """Write `model` (+ tokenizer) as an HF folder carrying `index`, atomically (see `atomic_dir`).

    `exit_heads` (a manyinone.train.exit_heads.ExitHeads) are written beside the weights and recorded
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
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError, OSError) as exc:
        raise ManyinoneError(f"checkpoint {str(path)!r} is corrupt: cannot read its budget index ({type(exc).__name__})") from None
    except Exception as exc:  # safetensors raises its own error type for a damaged header
        if isinstance(exc, ManyinoneError):
            raise
        raise ManyinoneError(f"checkpoint {str(path)!r} is corrupt: {WEIGHTS_FILE} unreadable ({exc})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ManyinoneError(f"checkpoint {str(path)!r} has an index of unknown format; expected {FORMAT!r}")
    missing = [k for k in ("adapter", "model_type", "space", "metric", "specs") if k not in index]
    specs_ok = isinstance(index.get("specs"), list) and all(
        isinstance(e, dict) and isinstance(e.get("spec"), dict) and isinstance(e.get("relative"), dict)
        and index.get("metric") in e["relative"] for e in index["specs"])
    if missing or not specs_ok:
        raise ManyinoneError(f"checkpoint {str(path)!r} is corrupt: budget index lacks {missing or ['valid specs']}")
    return index
