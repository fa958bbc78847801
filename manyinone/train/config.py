"""Strict training configuration: pydantic, from YAML and/or `key=value` overrides.

Example:
    >>> cfg = load_config(None, ["lr=2e-5", "exits=[6,12,30]"], output="runs/x")
    >>> cfg.lr, cfg.exits
    (2e-05, [6, 12, 30])
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from manyinone.core.errors import ManyinoneError, unreadable
from manyinone.core.kinds import COST_METRICS, EXIT_HEAD_KINDS, SAMPLERS

# Fields whose allowed values are what the registries hold when the config is validated: registering
# a sampler, exit-head kind or cost metric is all it takes (the help text lists the built-in ones).
REGISTERED = {"sampler": (SAMPLERS, ()), "exit_heads": (EXIT_HEAD_KINDS, ("none",)), "cost_metric": (COST_METRICS, ())}


class LoraSettings(BaseModel):
    """LoRA adapters (through peft) on the frozen base; every exit shares them, nested like the layers."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    r: int = Field(16, gt=0, le=4096, description="adapter rank")
    alpha: float | None = Field(None, gt=0, description="scale numerator (scale = alpha / r); default 2 * r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input")
    targets: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names to adapt (e.g. [q_proj, v_proj]), or all-linear: every Linear "
                                  "of the decoder layers (what QLoRA found needed to match a full fine-tune)")

    @field_validator("targets", mode="before")
    @classmethod
    def _targets_listed(cls, value):
        if isinstance(value, str) and value != "all-linear":  # targets=q_proj,v_proj: a list in one word
            return [t.strip() for t in value.split(",")]
        return value

    @field_validator("targets")
    @classmethod
    def _targets_named(cls, value):
        if isinstance(value, list) and (not value or not all(isinstance(t, str) and t.strip() for t in value)):
            raise ValueError(f"lora.targets {value} must name at least one module, e.g. [q_proj, v_proj] or all-linear")
        return value

    @property
    def scale_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * self.r


class TrainConfig(BaseModel):
    """Everything one `manyinone train` run needs; saved beside the run as train_config.yaml."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # lr=inf or nan is never meant

    model: str = Field("smollm2", description="HF folder, hub name, .gguf file, or 'smollm2' (embedded default)")
    axes: list[str] = Field(["depth"], description="nested axes to train")
    exits: list[int] | None = Field(None, description="depth exits, ascending; default: 5 evenly spaced")
    widths: list[int] | None = Field(None, description="MLP widths (neurons) for the width axis; default: 8 evenly spaced")
    heads: list[int] | None = Field(None, description="query heads for the heads axis (whole GQA groups); default: every group count")
    sizes: dict[str, list[int]] = Field(
        default_factory=dict, description="trained sizes of any axis by name, e.g. sizes.experts=[2,4,8] "
        "(an axis without a field of its own; exits/widths/heads name the built-in ones)")
    reorder: bool = Field(True, description="width/heads: sort neurons and heads by importance before training")
    calibration_batches: int = Field(8, gt=0, description="micro-batches of training data that score importance")
    data: str = Field("demo", description=".json/.jsonl/.parquet/.csv file, HF dataset name, or 'demo'; rows are "
                                          "alpaca (instruction/input/output), messages (multi-turn chat) or text")
    data_subset: str | None = Field(None, description="hub dataset: its subset (configuration) name")
    data_split: str = Field("train", description="hub dataset: the split to read")
    data_columns: dict[str, str] | None = Field(
        None, description="the row fields (instruction, input, output, messages, text) -> the source's column names, "
                          "e.g. {instruction: question, output: answer}")
    rows: str | None = Field(None, description="record slice START:END, e.g. 0:1800")
    template: Literal["auto", "alpaca", "chat"] = Field(
        "auto", description="prompt format: auto = the tokenizer's chat template when it has one, else alpaca "
                            "(messages rows always use the chat template)")
    packing: bool = Field(False, description="several examples per row of max_length tokens, attention kept inside "
                                             "each example and positions restarting (batch_size then counts rows)")
    output: str = Field("runs/manyinone", description="run folder: final checkpoint, metrics, resumable state")

    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps")
    batch_size: int = Field(8, gt=0, description="examples per micro-batch")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    max_length: int = Field(512, gt=8, le=2**20)
    lr: float = Field(5e-5, gt=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine floor as a fraction of lr")
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    nonfinite_skips: int = Field(0, ge=0, description="steps with a NaN/inf loss or gradient skipped without an "
                                                      "update before the run stops; 0 = stop at the first one")

    sampler: str = Field("all", description=f"which specs get a loss each step: {SAMPLERS.summaries()}")
    random_k: int = Field(2, gt=0, description="random-k: specs drawn per step (the full spec is added to them)")
    sandwich_random: int = Field(2, ge=0, description="sandwich: specs drawn per step between the smallest and "
                                                      "the full one")
    exit_weights: list[float] | None = Field(None, description="one loss weight per exit; default all 1")
    distill_weight: float = Field(0.0, ge=0, description="weight of KL(full || exit) self-distillation")
    distill_temperature: float = Field(1.0, gt=0)
    exit_heads: str = Field(
        "none", description=f"per-exit modules: none (the model's own norm and head), {EXIT_HEAD_KINDS.summaries()}")
    exit_heads_lr_scale: float = Field(1.0, gt=0, description="learning rate of the exit modules, as a multiple of lr (exit blocks train at lr itself)")
    freeze_base: bool = Field(False, description="train only the exit modules (SFT+heads: run on an SFT checkpoint)")
    segment_lr_scales: list[float] | None = Field(
        None, description="depth: one lr multiple per exit for the layers after the previous exit up to it "
                          "(e.g. [3,2,1,1,1] trains the first layers faster); embeddings, norm and head stay at 1")
    layer_dropout: float = Field(0.0, ge=0, lt=1, description="LayerSkip-style: per example, layer l is skipped "
                                                              "with probability rising linearly to this at the last layer")

    teacher: str | None = Field(None, description="frozen teacher (HF folder, hub name, .gguf, alias or run folder) "
                                                  "sharing the tokenizer; every exit gets a KL term towards it")
    teacher_weight: float = Field(1.0, ge=0, description="weight of each exit's KL to the teacher (full depth excluded)")
    teacher_full_weight: float = Field(1.0, ge=0, description="weight of the full depth's KL to the teacher")
    teacher_temperature: float = Field(1.0, gt=0)
    teacher_kl: Literal["forward", "reverse"] = Field(
        "forward", description="forward = KL(teacher || exit) (mass-covering); reverse = KL(exit || teacher) (mode-seeking)")
    teacher_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    mix_data: str | None = Field(None, description="a second record source (e.g. `manyinone distill-data` output) "
                                                   "mixed into every epoch")
    mix_rows: str | None = Field(None, description="record slice of mix_data, START:END")
    mix_ratio: float = Field(0.5, ge=0, le=1, description="fraction of each epoch's examples drawn from mix_data")

    exit_positions: float = Field(1.0, gt=0, le=1, description="fraction of supervised positions (drawn per "
                                  "micro-batch) where exits other than the full depth get their losses")
    on_policy_ratio: float = Field(0.0, ge=0, le=1, description="GKD-style: fraction of each micro-batch's rows "
                                   "whose response is the current model's own sample, scored against the teacher")
    on_policy_tokens: int = Field(128, gt=0, le=4096, description="most tokens sampled per on-policy row")
    on_policy_temperature: float = Field(1.0, gt=0, le=100, description="sampling temperature of on-policy rows")

    seed: int = Field(0, ge=0, le=2**32 - 1, description="derives every random stream: (seed, step), (seed, epoch)")
    save_every: int = Field(0, ge=0, description="optimizer steps between resumable checkpoints; 0 = end only")
    keep_checkpoints: int = Field(2, gt=0)
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        [], description="trackers that also get each step's metrics (metrics.jsonl is always written)")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, ...")
    cost_metric: str = Field("flops", description=f"what a budget counts: {COST_METRICS.summaries()}")
    gradient_checkpointing: bool = False
    compile_layers: bool = Field(False, description="torch.compile each decoder layer's forward (regional "
                                                    "compilation; the exit hooks stay eager)")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="weights in training: auto = bfloat16 with lora on CUDA (frozen base; adapters stay float32), "
                            "else float32 master weights under bf16 autocast")
    optimizer: Literal["adamw", "adamw8bit", "adamw4bit", "adamw-bf16sr"] = Field(
        "adamw", description="adamw (torch); adamw8bit / adamw4bit (torchao: 8/4-bit moments); adamw-bf16sr "
                             "(torchao: bf16 weights updated with stochastic rounding, no float32 master)")
    lora: LoraSettings | None = Field(None, description="LoRA-nested tuning through peft, e.g. lora.r=16 lora.alpha=32")
    loss_impl: Literal["lean", "plain"] = Field(
        "lean", description="exit losses: lean = fused chunked head + CE, no logits kept (same numbers); plain = logits per exit")

    @model_validator(mode="before")
    @classmethod
    def _sampler_k_renamed(cls, data: Any) -> Any:
        """sampler_k, the old single option, still reads: as the option of the sampler it configured
        (random-k's random_k, sandwich's sandwich_random; `all` has none and ignores it)."""
        if not isinstance(data, dict) or "sampler_k" not in data:
            return data
        data = dict(data)
        value = data.pop("sampler_k")
        sampler = data.get("sampler", cls.model_fields["sampler"].default)
        options = list(SAMPLERS.get(sampler).config_options.values()) if sampler in SAMPLERS.names() else []
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"sampler_k {value!r} must be a positive whole number (it is deprecated: set "
                             f"random_k or sandwich_random instead)")
        for field in options:
            if field in data:
                raise ValueError(f"sampler_k and {field} are both set; keep {field} (sampler_k is its deprecated name)")
            data[field] = value
        print(f"warning: config key sampler_k is deprecated; read as "
              f"{', '.join(f'{f}={value}' for f in options) or f'nothing (sampler {sampler!r} takes no option)'}; "
              "rename it", file=sys.stderr)
        return data

    @field_validator(*REGISTERED)
    @classmethod
    def _registered(cls, value: str, info) -> str:
        registry, built_in = REGISTERED[info.field_name]
        allowed = [*built_in, *registry.names()]
        if value not in allowed:
            raise ValueError(f"{info.field_name} {value!r} is not registered; allowed {allowed}")
        return value

    @field_validator("exits", "widths", "heads")
    @classmethod
    def _exits_sorted(cls, value: list[int] | None, info) -> list[int] | None:
        if value is not None and (not value or value != sorted(set(value))):
            raise ValueError(f"{info.field_name} {value} must be non-empty and strictly increasing, e.g. {sorted(set(value))}")
        return value

    @model_validator(mode="after")
    def _sizes_of_other_axes(self) -> "TrainConfig":
        own = {"depth": "exits", "width": "widths", "heads": "heads"}
        for axis, values in self.sizes.items():
            if axis in own:
                raise ValueError(f"sizes.{axis} is set by {own[axis]}; use {own[axis]}={values}")
            if axis not in self.axes:
                raise ValueError(f"sizes.{axis} names an axis this run does not train; axes are {self.axes}")
            if not values or values != sorted(set(values)) or values[0] < 1:
                raise ValueError(f"sizes.{axis}={values} must be positive and strictly increasing")
        return self

    @field_validator("report_to", mode="before")
    @classmethod
    def _trackers_listed(cls, value):
        if isinstance(value, str):  # report_to=tensorboard,wandb: a list in one word
            return [t.strip() for t in value.split(",") if t.strip()]
        return [] if value is None else value

    @field_validator("output")
    @classmethod
    def _output_named(cls, value: str) -> str:
        if not value.strip():  # Path("") is the current directory: a run would merge into it
            raise ValueError(f"output {value!r} is empty; give a run folder, e.g. runs/x")
        return value

    @field_validator("lora", mode="before")
    @classmethod
    def _lora_rank_alone(cls, value):
        if isinstance(value, bool):  # lora=true: the default settings; lora=false: off
            return {} if value else None
        return {"r": value} if isinstance(value, int) else value  # `--lora 16` / lora=16: a rank alone

    @model_validator(mode="after")
    def _frozen_needs_heads(self) -> "TrainConfig":
        if self.exit_heads in ("block", "layer") and self.lora is not None:
            raise ValueError(f"exit_heads={self.exit_heads!r} copies decoder layers, which LoRA wraps; use "
                             "exit_heads=translator with --lora")
        if self.freeze_base and self.exit_heads == "none":
            raise ValueError("freeze_base=true trains only exit modules; set exit_heads to translator or head")
        if self.lora is not None and set(self.axes) - {"depth"}:
            # width/heads slice the layers' weights directly; peft wraps those layers
            raise ValueError(f"lora trains the depth axis only; got axes {self.axes}, allowed [depth]")
        return self

    @model_validator(mode="after")
    def _segment_scales_fit(self) -> "TrainConfig":
        scales = self.segment_lr_scales
        if scales is not None:
            if self.exits is None or len(scales) != len(self.exits) or any(x <= 0 for x in scales):
                raise ValueError(f"segment_lr_scales {scales} needs explicit exits and one positive number per exit "
                                 f"(exits: {self.exits})")
        return self

    @model_validator(mode="after")
    def _packing_alone(self) -> "TrainConfig":
        if self.packing and self.on_policy_ratio > 0:
            raise ValueError("packing=true does not combine with on_policy_ratio > 0 (sampled responses replace "
                             "whole rows); turn one off")
        return self

    @model_validator(mode="after")
    def _on_policy_needs_teacher(self) -> "TrainConfig":
        if self.on_policy_ratio > 0 and not self.teacher:
            raise ValueError(f"on_policy_ratio={self.on_policy_ratio} scores the model's own samples against a "
                             "frozen teacher; set teacher=<run or model>")
        return self

    def axis_choices(self) -> dict[str, list[int] | None]:
        """Trained sizes per requested axis (None: the adapter's default), for `adapter.space`."""
        sizes = {**self.sizes, "depth": self.exits, "width": self.widths, "heads": self.heads}
        return {axis: sizes.get(axis) for axis in self.axes}


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice is an error (PyYAML silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                line = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: the mapping check below reports it
                continue
            if line != key_node.start_mark.line + 1:
                raise ManyinoneError(f"sets {key!r} twice (lines {line} and {key_node.start_mark.line + 1}); keep one")
        return super().construct_mapping(node, deep=deep)


_STRING_FIELDS = ("model", "data", "data_subset", "data_split", "rows", "output", "device", "template", "sampler",
                  "cost_metric", "exit_heads", "report_to",
                  "teacher", "teacher_kl", "teacher_dtype", "mix_data", "mix_rows", "dtype", "optimizer")


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ManyinoneError(f"override {item!r} malformed; expected key=value, e.g. lr=2e-5")
    if key.strip() in _STRING_FIELDS:  # taken verbatim: YAML 1.1 reads rows=10:20 as the number 620
        return key.strip(), raw
    try:
        value = yaml.safe_load(raw)
    except (yaml.YAMLError, ValueError, RecursionError):  # ValueError: an integer too long to convert
        value = raw
    return key.strip(), value


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """`lora.r=16` sets data["lora"]["r"]; a plain key sets data[key]."""
    head, dot, rest = key.partition(".")
    if not dot:
        data[key] = value
        return
    inner = data.get(head)
    if isinstance(inner, int) and not isinstance(inner, bool) and head == "lora":
        inner = {"r": inner}  # lora=16 then lora.alpha=32
    if inner is None or inner is True:
        inner = {}
    if not isinstance(inner, dict):
        raise ManyinoneError(f"override {key}={value!r}: {head!r} is not a group of settings (it is {inner!r})")
    data[head] = {**inner}
    _set_dotted(data[head], rest, value)


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or "config"
    allowed = ""
    if err["type"] == "extra_forbidden":
        model = LoraSettings if len(err["loc"]) > 1 and err["loc"][0] == "lora" else TrainConfig
        allowed = f"; allowed keys: {', '.join(model.model_fields)}"
    return f"config field {field!r}: {err['msg']} (got {err.get('input')!r:.60}){allowed}"


def load_config(path: str | Path | None, overrides: list[str] | None = None, recipe: str | None = None,
                **fields: Any) -> TrainConfig:
    """A named recipe (optional, `manyinone.train.recipes`), then a YAML file (optional), then
    `key=value` overrides, then explicit fields (CLI flags): each later source wins."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.load(Path(path).read_text(), Loader=_UniqueKeyLoader)
        except ManyinoneError as exc:  # a duplicate key
            raise ManyinoneError(f"config file {str(path)!r} {exc}") from None
        except OSError as exc:
            raise unreadable("config file", path, exc) from None
        except (yaml.YAMLError, ValueError, RecursionError) as exc:  # ValueError: bad UTF-8, an int of >4300 digits
            raise ManyinoneError(f"config file {str(path)!r} is not valid YAML ({type(exc).__name__})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ManyinoneError(f"config file {str(path)!r} must hold a mapping of keys, got {type(loaded).__name__}")
        odd = [k for k in (loaded or {}) if not isinstance(k, str)]  # YAML allows `? ` and `1:` keys
        if odd:
            raise ManyinoneError(f"config file {str(path)!r} has a key {odd[0]!r} that is not a name; allowed keys: "
                                 f"{', '.join(TrainConfig.model_fields)}")
        data.update(loaded or {})
    for key, value in (_parse_override(o) for o in overrides or []):
        _set_dotted(data, key, value)
    rank = fields.pop("lora", None)  # --lora R sets the rank and keeps any lora.* override
    data.update({k: v for k, v in fields.items() if v is not None})
    if rank is not None:
        _set_dotted(data, "lora.r", rank)
    if recipe is not None:
        from manyinone.train.recipes import check_supplied, recipe_settings

        exits = data.get("exits")
        preset = recipe_settings(recipe, len(exits) if isinstance(exits, list) else 5)  # 5: the default exits
        data = {**preset, **data}
        check_supplied(recipe, data)
    try:
        return TrainConfig(**data)
    except ValidationError as exc:
        raise ManyinoneError(_first_error(exc)) from None
