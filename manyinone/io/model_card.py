"""The model card (README.md) of an export: what the sub-model is, what it costs, how every budget
scored (when the run was evaluated) and how it was trained, from the files the run already holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

# train_config.yaml keys worth a reader's eye; the whole file is quoted below them anyway
KEY_SETTINGS = ("model", "data", "rows", "template", "axes", "exits", "widths", "heads", "epochs", "max_steps",
                "batch_size", "grad_accum", "max_length", "lr", "packing", "distill_weight", "teacher", "lora")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def eval_table(rows: list[dict[str, Any]], marked: str | None) -> list[str]:
    """Markdown rows of eval.json (one per exit/budget); `marked` is the exported spec's label."""
    columns = [("spec", "sub-model"), ("relative_cost", "relative cost"), ("loss", "held-out loss"),
               ("perplexity", "perplexity"), ("top1_accuracy", "top-1 accuracy"),
               ("top1_agreement", "agreement with full depth"), ("gen_agreement", "agreement on generations")]
    columns = [(k, name) for k, name in columns if any(k in r for r in rows)]
    lines = ["| " + " | ".join(name for _, name in columns) + " |", "|" + " --- |" * len(columns)]
    for r in rows:
        cells = [_fmt(r.get(k)) for k, _ in columns]
        if r.get("spec") == marked:
            cells[0] = f"**{cells[0]}** (this export)"
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def model_card(index: dict[str, Any], source: str | Path, entry: dict[str, Any] | None = None,
               files: list[str] | None = None) -> str:
    """README.md text. `index`: the export's budget index; `entry`: the exported spec's entry in the
    source index (None for an --all export: every budget is listed); `source`: the run folder."""
    source = Path(source)
    name = source.resolve().name
    lines = ["---", "library_name: transformers", "tags:", "- manyinone", "- nested", "- early-exit", "---", ""]
    train = index.get("train") or {}
    specs = index.get("specs") or []
    if entry is not None:
        spec = entry["spec"]
        label = ", ".join(f"{k}={v}" for k, v in spec.items())
        rel = entry.get("relative_to_source") or entry.get("relative") or {}
        lines += [f"# {name}: sub-model {label}", "",
                  f"A nested sub-model cut from the manyinone run `{name}` (base model `{train.get('model', '?')}`). "
                  "It is a plain Hugging Face checkpoint: `AutoModelForCausalLM.from_pretrained(folder)` loads it "
                  "with no manyinone code.", "",
                  "## Spec and cost", "", "| | |", "| --- | --- |",
                  *[f"| {k} | {v} |" for k, v in spec.items()],
                  f"| parameters | {_fmt(entry.get('params'))} |",
                  f"| FLOPs per token (context {index.get('context', '?')}) | {_fmt(entry.get('flops_per_token'))} |",
                  *[f"| cost relative to the full model ({k}) | {_fmt(v)} |" for k, v in rel.items()]]
    else:
        lines += [f"# {name}: every budget", "",
                  "One budget-indexed checkpoint: `manyinone.load(folder, budget=b)` gives the largest sub-model "
                  "within budget b; plain transformers loads the full model.", "",
                  "## Budgets", "", "| sub-model | parameters | FLOPs per token | relative cost |",
                  "| --- | --- | --- | --- |"]
        for e in specs:
            label = ", ".join(f"{k}={v}" for k, v in e["spec"].items())
            rel = (e.get("relative") or {}).get(index.get("metric", "flops"))
            lines.append(f"| {label} | {_fmt(e.get('params'))} | {_fmt(e.get('flops_per_token'))} | {_fmt(rel)} |")
    rows = _read_json(source / "eval.json")
    if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
        marked = ",".join(f"{k}={v}" for k, v in entry["spec"].items()) if entry is not None else None
        lines += ["", "## Evaluation (every budget of the source run)", "",
                  "From `manyinone eval` on the source run (its eval.json); losses in nats per token.", "",
                  *eval_table(rows, marked)]
    config_text = None
    try:
        config_text = (source / "train_config.yaml").read_text(encoding="utf-8")
        config = yaml.safe_load(config_text) or {}
    except (OSError, yaml.YAMLError):
        config = {}
    lines += ["", "## How it was trained", ""]
    if config:
        lines += [f"- {k}: `{config[k]}`" for k in KEY_SETTINGS if config.get(k) is not None]
        lines += ["", "The whole configuration (train_config.yaml):", "", "```yaml", config_text.rstrip(), "```"]
    else:
        lines += [f"- model: `{train.get('model', '?')}`, data: `{train.get('data', '?')}`, template: "
                  f"`{train.get('template', '?')}`, steps: {train.get('steps', '?')} (train_config.yaml not found)"]
    if files:
        lines += ["", "## Files", "", *[f"- `{f}`" for f in files]]
    return "\n".join(lines) + "\n"
