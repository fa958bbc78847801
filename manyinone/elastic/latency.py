"""Measured latency lookup table: milliseconds per decoder layer for each option (one layer's size
on every per-layer axis), so budgets can be given in milliseconds as well as fractions (Flextron's
latency surrogate).

Measured once on the target device through the adapter's own sliced forward: for each option, the
whole model at depth L and at depth 1; the difference over L - 1 is one layer, the rest is the
embedding, final norm and LM head. Stored as JSON beside a checkpoint: `layer_ms` is keyed by the
option's sizes joined by commas in the order of the table's `axes` ("768,6" for axes
["width", "heads"]); a table without `axes` (written before axes were named) is (width, heads).

Example:
    >>> table = measure_latency(adapter, [{"width": 768, "heads": 6}, {"width": 1536, "heads": 9}])
    >>> plan_ms(table, [{"width": 768, "heads": 6}] * 30)
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from manyinone.core.adapter import Option  # one layer's sizes, axis -> size
from manyinone.core.axes import PAIR_AXES, LayerSizes, as_plan, encode_sizes, layer_sizes, plan_axes
from manyinone.core.errors import ManyinoneError


def table_axes(table: dict[str, Any]) -> tuple[str, ...]:
    """The axes a table's keys list sizes for, in order ((width, heads) for a table that names none)."""
    return tuple(table.get("axes") or PAIR_AXES)


def _key(option: Option, axes: Sequence[str]) -> str:
    return ",".join(map(str, encode_sizes(layer_sizes(option), axes)))


def table_options(table: dict[str, Any]) -> list[LayerSizes]:
    """The options a table measured, as axis-keyed sizes."""
    axes = table_axes(table)
    return [layer_sizes([int(v) for v in k.split(",")], axes) for k in table["layer_ms"]]


def _timed_ms(fn, device: torch.device, repeats: int, warmup: int) -> float:
    """Median wall time of fn() in ms, synchronising the device around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def measure_latency(adapter, options: Sequence[Option], batch: int = 16, seq: int = 512, repeats: int = 10,
                    warmup: int = 3, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """{"axes": [...], "layer_ms": {"sizes,...": ms of one layer}, "rest_ms": ms outside the layers, ...}
    for one forward of [batch, seq] tokens on the model's device (bf16 autocast on CUDA unless `dtype`
    says otherwise). options: one layer's sizes each (mappings, or old (width, heads) pairs)."""
    model = adapter.model.eval()
    device = next(model.parameters()).device
    num_layers = adapter.num_layers
    if num_layers < 2:
        raise ManyinoneError("a latency table needs a model of at least 2 layers (it times depth L against depth 1)")
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)
    mask = torch.ones_like(ids)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    options = list(as_plan(options))
    axes = plan_axes(options)
    layer_ms, rest = {}, []
    for option in options:
        with autocast:
            deep = _timed_ms(lambda: adapter.forward_plan(ids, mask, (option,) * num_layers), device, repeats, warmup)
            one = _timed_ms(lambda: adapter.forward_plan(ids, mask, (option,)), device, repeats, warmup)
        per_layer = max(deep - one, 0.0) / (num_layers - 1)
        layer_ms[_key(option, axes)] = per_layer
        rest.append(max(one - per_layer, 0.0))
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "batch": batch, "seq": seq, "dtype": str(dtype).removeprefix("torch."), "num_layers": num_layers,
            "axes": list(axes), "layer_ms": layer_ms, "rest_ms": statistics.median(rest)}


def plan_ms(table: dict[str, Any], plan: Sequence[Option]) -> float:
    """Estimated ms of one forward of a per-layer plan: the rest plus each layer's measured time."""
    axes = table_axes(table)
    plan = as_plan(plan)
    named = sorted({a for o in plan for a in o} - set(axes))
    if named:
        raise ManyinoneError(f"latency table times axes {list(axes)}; the plan also names {named}")
    missing = sorted({_key(o, axes) for o in plan} - set(table["layer_ms"]))
    if missing:
        raise ManyinoneError(f"latency table has no entry for options {missing}; measured: {sorted(table['layer_ms'])}")
    return table["rest_ms"] + sum(table["layer_ms"][_key(o, axes)] for o in plan)


def relative_budget(table: dict[str, Any], full_plan: Sequence[Option], ms: float) -> float:
    """A budget in milliseconds as a fraction of the full plan's measured time (for `--budget`)."""
    full = plan_ms(table, full_plan)
    if not ms > 0:
        raise ManyinoneError(f"latency budget {ms!r} ms out of range; allowed > 0 (full model: {full:.2f} ms)")
    return min(ms / full, 1.0)


def spec_plan(spec: dict[str, int], space: dict[str, dict], axes: Sequence[str] = PAIR_AXES) -> list[Option]:
    """The per-layer sizes on `axes` of a uniform spec, axes it lacks at their totals in `space`
    (an index's "space"; a depth-only index needs the table's full option, see `index_budget_for_ms`)."""
    total = {axis: int(v["total"]) for axis, v in space.items()}
    depth = spec.get("depth", total.get("depth"))
    return [layer_sizes({a: spec.get(a, total[a]) for a in axes})] * int(depth)


def index_budget_for_ms(index: dict[str, Any], table: dict[str, Any], ms: float) -> float:
    """The relative cost (the index's metric) of the index's sub-network with the largest measured
    time within `ms`, so `--budget-ms` resolves through the ordinary budget path."""
    axes, options = table_axes(table), table_options(table)
    # An axis the index does not nest runs at full size: the largest the table measured.
    space = {**{a: {"total": max(o[a] for o in options)} for a in axes},
             "depth": {"total": table["num_layers"]}, **index["space"]}
    priced = [(plan_ms(table, spec_plan(e["spec"], space, axes)), e["relative"][index["metric"]]) for e in index["specs"]]
    fitting = [p for p in priced if p[0] <= ms]
    if not fitting:
        fastest = min(t for t, _ in priced)
        raise ManyinoneError(f"latency budget {ms} ms is below the fastest sub-model ({fastest:.2f} ms on "
                             f"{table.get('device', '?')}); allowed >= {fastest:.2f}")
    return max(fitting)[1]


def option_table(table: dict[str, Any], options: Sequence[Option], num_layers: int, full_plan: Sequence[Option]
                 ) -> tuple[torch.Tensor, float]:
    """Router cost table from measured latency: ([layers, options] ms / full ms, rest share)."""
    full = plan_ms(table, full_plan)
    row = [table["layer_ms"][_key(o, table_axes(table))] / full for o in as_plan(options)]
    return torch.tensor([row] * num_layers), table["rest_ms"] / full


def save_table(table: dict[str, Any], path: str | Path) -> Path:
    """Write `table` as JSON through the durable writer (fsync, one rename)."""
    from manyinone.io.durable import write_text_durably

    path = Path(path)
    write_text_durably(path, json.dumps(table, indent=2) + "\n")
    return path


def load_table(path: str | Path) -> dict[str, Any]:
    try:
        table = json.loads(Path(path).read_text())
    except IsADirectoryError:
        raise ManyinoneError(f"latency table {str(path)!r} is a folder; expected a JSON file") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ManyinoneError(f"latency table {str(path)!r} unreadable ({type(exc).__name__})") from None
    keys_ok = isinstance(table, dict) and isinstance(table.get("layer_ms"), dict) and table["layer_ms"] \
        and isinstance(table.get("num_layers"), int) and "rest_ms" in table \
        and (table.get("axes") is None or (isinstance(table["axes"], list) and table["axes"]
                                           and all(isinstance(a, str) for a in table["axes"])))
    try:
        options_ok = keys_ok and all(len(tuple(map(int, k.split(",")))) == len(table_axes(table)) for k in table["layer_ms"])
    except ValueError:
        options_ok = False
    if not options_ok:
        raise ManyinoneError(f"latency table {str(path)!r} lacks layer_ms (keys: sizes in the order of its axes, "
                             "'width,heads' when it names none), rest_ms or num_layers; write it with measure_latency")
    return table
