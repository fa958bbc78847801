"""The budget index, typed: what every checkpoint records about its sub-networks and their costs.

One schema (`BudgetIndex`, strict pydantic, unknown keys refused), one parser (`parse_index`, the
only way an index read from disk becomes trusted) and one serialiser (`dumps_index`, what both the
manyinone.json file and the safetensors metadata copy are written from, so they cannot differ).
Every error is one line naming the field: `budget index field specs[0].spec.depth: ...`.

Versioned by `format`: "manyinone/1" is the only version so far; a future version adds a migration
to `MIGRATIONS` (old format -> function returning the newer dict), so old checkpoints keep opening.

Example:
    >>> index = parse_index(json.loads(text), source="runs/x")
    >>> index.spec_costs()      # {SubnetSpec(depth=2): 0.53, SubnetSpec(depth=4): 1.0}
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError, model_validator

from manyinone.core.axes import PAIR_AXES, LayerPlan, as_plan
from manyinone.core.cost import METRICS, check_budget, resolve_budget
from manyinone.core.errors import ManyinoneError
from manyinone.core.space import SubnetSpec

Metric = Literal[METRICS]  # the cost metrics registered in core.cost (one registration adds one)

FORMAT = "manyinone/1"
MIGRATIONS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {}  # older format -> upgrade to the next
EPS = 1e-9  # float slack for "relative cost <= 1" and monotone costs


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class AxisRecord(_Strict):
    """One nested axis of the space: its full size and the trained sizes."""

    total: StrictInt = Field(ge=1)
    choices: list[StrictInt] = Field(min_length=1)

    @model_validator(mode="after")
    def _choices_in_range(self) -> "AxisRecord":
        bad = [c for c in self.choices if not 1 <= c <= self.total]
        if bad:
            raise ValueError(f"choices {bad} out of range; allowed 1..total={self.total}")
        return self


class SpecRecord(_Strict):
    """One sub-network: its spec (axis -> size), absolute cost and cost relative to the full model."""

    spec: dict[str, StrictInt]
    params: StrictInt = Field(ge=0)
    flops_per_token: StrictFloat = Field(ge=0)
    relative: dict[Metric, StrictFloat]
    relative_to_source: Optional[dict[Metric, StrictFloat]] = None  # exports only

    @model_validator(mode="after")
    def _costs_in_range(self) -> "SpecRecord":
        bad = {k: v for k, v in self.relative.items() if not 0 < v <= 1 + EPS}
        if bad:
            raise ValueError(f"relative costs {bad} out of range; allowed 0 < cost <= 1 (fraction of the full model)")
        return self


class TrainRecord(_Strict):
    """What the checkpoint was trained from (templates matter at serving time: same prompt format)."""

    model: Optional[StrictStr] = None
    data: Optional[StrictStr] = None
    rows: Optional[StrictStr] = None
    template: Optional[StrictStr] = None
    steps: Optional[StrictInt] = None
    tuning: Optional[StrictStr] = None  # e.g. "lora r=16 ..., merged"; absent: a full fine-tune


class ExitHeadsRecord(_Strict):
    file: StrictStr
    kind: StrictStr
    specs: list[dict[str, StrictInt]]


class RoutedPlan(_Strict):
    """A router's fixed per-layer plan for one budget: per kept layer, its sizes in the order of the
    router's `axes` ((width, heads) when the router names none)."""

    budget: StrictFloat
    plan: list[list[StrictInt]] = Field(min_length=1)
    relative: StrictFloat = Field(gt=0)


class RouterRecord(_Strict):
    """The router's options (one layer's sizes each, in `axes` order). `axes` is absent for
    (width, heads), so width/heads checkpoints keep the exact layout earlier versions read."""

    options: list[list[StrictInt]] = Field(min_length=1)
    context_size: Optional[StrictInt] = None
    metric: Metric = "flops"
    axes: Optional[list[StrictStr]] = Field(None, min_length=1)

    @property
    def plan_axes(self) -> tuple[str, ...]:
        return tuple(self.axes) if self.axes else PAIR_AXES


class TokenRoutedBudget(_Strict):
    """One budget of a token router: its K per-layer plans (one chosen per token), each plan's
    relative cost, the share of calibration tokens each took and their measured average cost."""

    budget: StrictFloat
    plans: list[list[tuple[StrictInt, StrictInt]]] = Field(min_length=1)
    costs: list[StrictFloat] = Field(min_length=1)
    usage: list[StrictFloat] = Field(min_length=1)
    average: StrictFloat = Field(gt=0)
    widest: list[tuple[StrictInt, StrictInt]] = Field(min_length=1)  # per layer, the widest plan tokens used

    @model_validator(mode="after")
    def _one_per_plan(self) -> "TokenRoutedBudget":
        if not len(self.plans) == len(self.costs) == len(self.usage):
            raise ValueError(f"{len(self.plans)} plans, {len(self.costs)} costs and {len(self.usage)} usage shares; "
                             "need one of each per plan")
        return self


class TokenRouterRecord(_Strict):
    num_layers: StrictInt = Field(ge=1)
    widths: list[StrictInt] = Field(min_length=1)
    heads: list[StrictInt] = Field(min_length=1)
    embed_size: StrictInt = Field(ge=1)
    num_plans: StrictInt = Field(ge=1)
    hidden: StrictInt = Field(ge=1)
    metric: Metric = "flops"


class ExportRecord(_Strict):
    budget: StrictFloat
    spec: dict[str, StrictInt]
    # "from" is a Python keyword: the field is `source` in code and "from" on disk.
    source: StrictStr = Field(alias="from")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _largest_within(entries, cost: Callable[[Any], float], budget: float, smallest: str):
    """The entry of the largest cost(entry) within `budget` (ties: the larger stored budget). A budget
    below every entry is refused, naming `smallest` ("<which> (<cost kind>") and its cost."""
    budget = check_budget(budget)
    fitting = [e for e in entries if cost(e) <= budget + EPS]
    if not fitting:
        low = min(cost(e) for e in entries)
        raise ManyinoneError(f"budget {budget} is below {smallest} {low:.3f}); allowed {low:.3f} <= budget <= 1")
    return max(fitting, key=lambda e: (cost(e), e.budget))


class BudgetIndex(_Strict):
    """The budget index of one checkpoint (see the module docstring)."""

    format: Literal["manyinone/1"]
    adapter: StrictStr
    model_type: StrictStr
    space: dict[str, AxisRecord] = Field(min_length=1)
    metric: Metric
    context: StrictInt = Field(512, ge=1)
    specs: list[SpecRecord] = Field(min_length=1)
    train: Optional[TrainRecord] = None
    exit_heads: Optional[ExitHeadsRecord] = None
    routed: Optional[list[RoutedPlan]] = None
    router: Optional[RouterRecord] = None
    token_routed: Optional[list[TokenRoutedBudget]] = None
    token_router: Optional[TokenRouterRecord] = None
    runtime: Optional[dict[str, dict[str, Any]]] = None  # tuned settings, e.g. {"speculative": {...}}
    exported: Optional[ExportRecord] = None

    @model_validator(mode="after")
    def _consistent(self) -> "BudgetIndex":
        axes = self.plan_axes
        sized = [(f"router.options[{i}]", o) for i, o in enumerate(self.router.options if self.router else [])]
        sized += [(f"routed[{i}].plan[{j}]", o) for i, r in enumerate(self.routed or []) for j, o in enumerate(r.plan)]
        for field, sizes in sized:
            if len(sizes) != len(axes):
                raise _FieldError(field, f"{len(sizes)} sizes for the axes {list(axes)}; need one per axis")
        for i, entry in enumerate(self.specs):
            if self.metric not in entry.relative:
                raise _FieldError(f"specs[{i}].relative", f"lacks the index's metric {self.metric!r}")
            for axis, size in entry.spec.items():
                if axis not in self.space:
                    raise _FieldError(f"specs[{i}].spec.{axis}", f"axis not in the space {sorted(self.space)}")
                total = self.space[axis].total
                if not 1 <= size <= total:
                    raise _FieldError(f"specs[{i}].spec.{axis}", f"{size} out of range; allowed 1..{total} "
                                                                  f"(space.{axis}.total)")
        # Monotone: a sub-network nested inside another never costs more.
        for i, a in enumerate(self.specs):
            for j, b in enumerate(self.specs):
                inside = i != j and a.spec.keys() == b.spec.keys() and all(a.spec[k] <= b.spec[k] for k in a.spec)
                if inside and a.relative[self.metric] > b.relative[self.metric] + EPS:
                    raise _FieldError(f"specs[{i}].relative.{self.metric}",
                                      f"{a.relative[self.metric]} exceeds {b.relative[self.metric]} of specs[{j}], "
                                      "which contains it; costs must grow along every axis")
        return self

    # --- reading ---------------------------------------------------------------------------
    def spec_costs(self) -> dict[SubnetSpec, float]:
        """spec -> relative cost under the index's metric."""
        return {SubnetSpec(e.spec): e.relative[self.metric] for e in self.specs}

    def resolve(self, budget: float | None) -> SubnetSpec:
        return resolve_budget(self.spec_costs(), budget)

    @property
    def plan_axes(self) -> tuple[str, ...]:
        """The axes the stored routed plans list sizes for, in order."""
        return self.router.plan_axes if self.router else PAIR_AXES

    def routed_plan(self, budget: float | None) -> LayerPlan | None:
        """The stored per-layer plan (one SubnetSpec per layer) of the largest relative cost within
        `budget`; None when the index holds no routed plans (or budget is None: the full model)."""
        if not self.routed or budget is None:
            return None
        best = _largest_within(self.routed, lambda r: r.relative, budget, "the smallest routed plan (cost")
        return as_plan(best.plan, self.plan_axes)

    def token_routed_budget(self, budget: float | None) -> TokenRoutedBudget | None:
        """The token-routed budget of the largest measured average cost within `budget`; None when the
        index holds none (or budget is None: the full model)."""
        if not self.token_routed or budget is None:
            return None
        return _largest_within(self.token_routed, lambda r: r.average, budget,
                               "the cheapest token-routed budget (average cost")

    def check_model(self, num_layers: int, source: str = "checkpoint") -> None:
        """Refuse an index that describes more layers than the model it ships with has."""
        depth = self.space.get("depth")
        if depth is not None and depth.total > num_layers:
            raise ManyinoneError(f"{source} is corrupt: budget index field space.depth.total: {depth.total} exceeds "
                                 f"the model's {num_layers} layers")

    def to_dict(self) -> dict[str, Any]:
        """The plain dict (as on disk), for callers that read it as JSON."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)


class _FieldError(ValueError):
    """A consistency error tied to one field path (raised inside validators, reported by parse_index)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _location(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _first_error(exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    field = _location(tuple(p for p in err["loc"] if not str(p).startswith("function-")))
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, _FieldError):
        field = ".".join(p for p in (field, cause.field) if p) if field else cause.field
        message = str(cause)
    else:
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] not in ("missing", "extra_forbidden") and "input" in err:
            message += f" (got {err['input']!r:.60})"
        if err["type"] == "extra_forbidden":
            message = "unknown field (not part of the budget index)"
    return f"budget index field {field or '(top level)'}: {message}"


def parse_index(raw: Any, source: str = "checkpoint") -> BudgetIndex:
    """The one parser: a dict read from manyinone.json or the safetensors metadata -> BudgetIndex.

    Raises ManyinoneError "<source> has an index of unknown format ..." for another version, and
    "<source> is corrupt: budget index field <path>: <why>" for anything else wrong.
    """
    if not isinstance(raw, Mapping):
        raise ManyinoneError(f"{source} is corrupt: budget index is a {type(raw).__name__}, not an object")
    raw = dict(raw)
    while raw.get("format") in MIGRATIONS:
        raw = MIGRATIONS[raw["format"]](raw)
    if raw.get("format") != FORMAT:
        raise ManyinoneError(f"{source} has an index of unknown format {raw.get('format')!r}; expected {FORMAT!r}")
    try:
        return BudgetIndex.model_validate(raw)
    except ValidationError as exc:
        raise ManyinoneError(f"{source} is corrupt: {_first_error(exc)}") from None


def dumps_index(index: BudgetIndex | Mapping[str, Any], indent: int | None = None) -> str:
    """The one serialiser: validated first, so no writer can store an index a reader would refuse."""
    if not isinstance(index, BudgetIndex):
        index = parse_index(index, "budget index being written")
    return json.dumps(index.to_dict(), indent=indent)


__all__ = ["BudgetIndex", "FORMAT", "METRICS", "MIGRATIONS", "dumps_index", "parse_index"]
