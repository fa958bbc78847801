"""`manyinone` command line: thin typer commands over the library functions.

Every bad input ends as `error: <one line>` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from manyinone.core.errors import ManyinoneError
from manyinone.train.recipes import RECIPES
from manyinone.io.aliases import alias_help

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Train one LLM as many nested sub-models; export and serve any budget.")
console = Console()


def _friendly(fn: Callable) -> Callable:
    """Turn ManyinoneError into a one-line message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ManyinoneError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt as exc:  # training's graceful stop says where its state was saved
            typer.echo(f"interrupted: {exc}" if str(exc) else "interrupted", err=True)
            raise typer.Exit(getattr(exc, "exit_code", 130)) from None

    return wrapper


def _at_least(value: int, low: int, name: str) -> int:
    if value < low:
        raise ManyinoneError(f"{name} {value} out of range; allowed >= {low}")
    return value


def _in_range(value: int, low: int, high: int, name: str) -> int:
    if not low <= value <= high:
        raise ManyinoneError(f"{name} {value} out of range; allowed {low} to {high}")
    return value


def _int_list(text: Optional[str], name: str) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ManyinoneError(f"{name} {text!r} malformed; expected comma-separated integers, e.g. 6,12,18,24,30") from None


def config_keys_help() -> str:
    """Every TrainConfig key with its default and description, for `train --help` (rich markup escaped;
    blank lines keep one key per line, since rich joins single line breaks)."""
    from rich.markup import escape

    from manyinone.train.config import TrainConfig

    lines = ["Config keys (a --config YAML file or --set key=value), with their defaults:"]
    for name, field in TrainConfig.model_fields.items():
        default = field.default_factory() if field.default_factory is not None else field.default
        lines.append(escape(f"{name} = {default!r}" + (f": {field.description}" if field.description else "")))
    return "\n\n".join(lines)


@app.command(epilog=config_keys_help())
@_friendly
def train(
    model: Optional[str] = typer.Option(None, help="HF folder, hub name, .gguf file or an alias: "
                                                   f"{alias_help()} (default smollm2)"),
    axes: Optional[str] = typer.Option(None, help="comma-separated nested axes, e.g. depth"),
    exits: Optional[str] = typer.Option(None, help="depth exits, e.g. 6,12,18,24,30 (default: 5 evenly spaced)"),
    data: Optional[str] = typer.Option(None, help=".json/.jsonl/.parquet/.csv file, HF dataset name or folder, "
                                                  "or 'demo' (default); rows: alpaca, messages or text"),
    rows: Optional[str] = typer.Option(None, help="record slice START:END, e.g. 0:1800"),
    output: Optional[str] = typer.Option(None, help="run folder (default runs/manyinone)"),
    epochs: Optional[float] = typer.Option(None),
    max_steps: Optional[int] = typer.Option(None),
    batch_size: Optional[int] = typer.Option(None),
    lr: Optional[float] = typer.Option(None),
    lora: Optional[int] = typer.Option(None, help="LoRA-nested tuning through peft at this rank (frozen base, adapters "
                                                  "shared by every exit); more with --set lora.alpha=32 --set lora.targets=q_proj,v_proj"),
    dtype: Optional[str] = typer.Option(None, help="weights in training: auto (default: bfloat16 with --lora on CUDA, "
                                                   "else float32), float32 or bfloat16"),
    config: Optional[Path] = typer.Option(None, help="YAML file with TrainConfig fields"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="override a config field: key=value"),
    recipe: Optional[str] = typer.Option(None, help="a measured preset, applied first (flags and --set win): "
                                         + "; ".join(f"{n}: {d}" for n, (d, _) in RECIPES.items())),
    quiet: bool = typer.Option(False, help="no progress bar"),
    report_to: Optional[list[str]] = typer.Option(None, "--report-to", help="also log metrics to tensorboard "
                                                  "and/or wandb (repeat the flag; metrics.jsonl is always written)"),
) -> None:
    """Fine-tune so that every exit is a usable model (SoFT); `--exits 30` alone is plain SFT."""
    from manyinone.train.config import load_config
    from manyinone.train.loop import train as run_training

    cfg = load_config(config, set_, recipe=recipe, model=model, axes=axes.split(",") if axes else None,
                      exits=_int_list(exits, "exits"), data=data, rows=rows, output=output, epochs=epochs,
                      max_steps=max_steps, batch_size=batch_size, lr=lr, lora=lora, dtype=dtype,
                      report_to=[t for item in report_to for t in item.split(",")] if report_to else None)
    out = run_training(cfg, show_progress=not quiet)
    console.print(f"checkpoint written to [bold]{out}[/] (metrics: {out / 'metrics.jsonl'})")


@app.command()
@_friendly
def export(
    ckpt: Path = typer.Argument(..., help="checkpoint folder from `manyinone train`"),
    output: Path = typer.Option(..., "--output", "-o"),
    budget: Optional[float] = typer.Option(None, help="fraction of the full cost, 0 < budget <= 1"),
    all_: bool = typer.Option(False, "--all", help="one budget-indexed checkpoint holding every budget"),
    budget_ms: Optional[float] = typer.Option(None, help="a budget in measured milliseconds (needs --latency)"),
    latency: Optional[Path] = typer.Option(None, help="latency table JSON (benchmarks/pareto.py writes one)"),
    dtype: str = typer.Option("float32", help="weights of the export: float32, bfloat16 or float16"),
    max_shard_size: str = typer.Option("5GB", help="weights above this are split into HF shards (e.g. 5GB, 500MB)"),
    gguf: bool = typer.Option(False, "--gguf", help="also write GGUF for llama.cpp: model.gguf, or with --all "
                                                   "model-<spec>.gguf for every budget"),
) -> None:
    """Write a sub-model as a plain HF checkpoint, or all of them as one budget-indexed one (the source's
    every byte is checked against its sha256 first)."""
    from manyinone.io.export import export_all, export_budget

    if budget_ms is not None:
        from manyinone.io.checkpoint import read_index
        from manyinone.elastic.latency import index_budget_for_ms, load_table

        if latency is None or budget is not None:
            raise ManyinoneError("--budget-ms needs --latency TABLE.json and no --budget")
        budget = index_budget_for_ms(read_index(ckpt), load_table(latency), budget_ms)

    if all_ == (budget is not None):
        raise ManyinoneError("give exactly one of --budget B or --all")
    shard = int(max_shard_size) if max_shard_size.isdigit() else max_shard_size
    out = export_all(ckpt, output, dtype, shard, gguf) if all_ else export_budget(ckpt, budget, output, dtype, shard, gguf)
    console.print(f"exported to [bold]{out}[/]")


@app.command()
@_friendly
def route(
    ckpt: Path = typer.Argument(..., help="checkpoint trained with elastic width/heads (`--axes width,heads`)"),
    output: Path = typer.Option(..., "--output", "-o", help="new checkpoint folder holding the router"),
    budgets: str = typer.Option(..., help="comma-separated budgets, e.g. 0.4,0.6,0.8"),
    mode: str = typer.Option("token", help="token (a plan per token), static (a plan per budget) or "
                                           "adaptive (a plan per prompt)"),
    data: Optional[str] = typer.Option(None, help="data to train the router on (default: the checkpoint's training data)"),
    rows: Optional[str] = typer.Option(None, help="record slice START:END (default: the checkpoint's training rows)"),
    steps: int = typer.Option(200, help="router training steps (the model stays frozen)"),
    plans: int = typer.Option(4, help="token mode: plans per budget, one chosen per token"),
    batch_size: int = typer.Option(8),
    max_length: int = typer.Option(512),
    cost_weight: float = typer.Option(30.0, help="weight of the budget penalty against the LM loss"),
    device: str = typer.Option("auto"),
) -> None:
    """Train a router over a checkpoint's widths and heads and write it into a new budget-indexed
    checkpoint; `manyinone serve` and manyinone.load then use it."""
    from manyinone.elastic.route import parse_budgets, route_checkpoint
    from manyinone.io.checkpoint import read_index

    trained = read_index(ckpt).get("train") or {}
    data = data or trained.get("data")
    if data is None:
        raise ManyinoneError(f"{str(ckpt)!r} does not record its training data; give --data")
    result = route_checkpoint(ckpt, output, mode, parse_budgets(budgets), data=data, rows=rows or trained.get("rows"),
                              steps=_at_least(steps, 1, "steps"), batch_size=_at_least(batch_size, 1, "batch size"),
                              max_length=max_length, num_plans=_at_least(plans, 1, "plans"), cost_weight=cost_weight,
                              device=device)
    for entry in result["budgets"]:
        if "average" in entry:
            used = sum(u > 0 for u in entry["usage"])
            typer.echo(f"budget {entry['budget']:.3f}: average cost {entry['average']:.3f} over the calibration "
                       f"tokens, {used} of {len(entry['plans'])} plans used")
    console.print(f"routed ({result['mode']}) into [bold]{result['output']}[/]")


@app.command()
@_friendly
def latency(
    ckpt: Path = typer.Argument(..., help="checkpoint with elastic width/heads"),
    output: Path = typer.Option(Path("latency.json"), "--output", "-o"),
    batch: int = typer.Option(1, help="rows of the timed forward"),
    seq: int = typer.Option(128, help="tokens per row of the timed forward"),
    repeats: int = typer.Option(10),
    device: str = typer.Option("auto"),
) -> None:
    """Measure ms per decoder layer for every trained (width, heads) on this device and write the table
    that `export --budget-ms` and millisecond budgets read."""
    from manyinone.elastic.route import write_latency

    table = write_latency(ckpt, output, _at_least(batch, 1, "batch"), _at_least(seq, 1, "seq"),
                          _at_least(repeats, 1, "repeats"), device)
    typer.echo(f"{len(table['layer_ms'])} options timed on {table['device']} ([{batch}, {seq}] tokens, "
               f"{table['dtype']}); {table['rest_ms']:.3f} ms outside the layers; written to {output}")


@app.command()
@_friendly
def verify(ckpt: Path = typer.Argument(..., help="checkpoint, export or resume folder written by manyinone")) -> None:
    """Check every byte of a checkpoint against its checksums.json (sha256); opening checks only sizes
    and small files. Exit code 2 names the first missing, truncated or altered file."""
    from manyinone.io.checkpoint import recover_interrupted
    from manyinone.io.integrity import CHECKSUMS_FILE, verify_checksums

    recover_interrupted(ckpt)
    if not ckpt.is_dir():
        raise ManyinoneError(f"checkpoint {str(ckpt)!r} not found (expected a folder written by manyinone)")
    if not (ckpt / CHECKSUMS_FILE).is_file():
        raise ManyinoneError(f"{str(ckpt)!r} has no {CHECKSUMS_FILE}: not a folder manyinone wrote (or its listing "
                             "was removed), so there is nothing to verify against")
    verify_checksums(ckpt, "checkpoint", full=True)
    files = len(json.loads((ckpt / CHECKSUMS_FILE).read_text()))
    typer.echo(f"{ckpt}: all {files} listed files match their sha256")


@app.command()
@_friendly
def info(ckpt: Path = typer.Argument(..., help="checkpoint folder")) -> None:
    """List the budgets, specs and costs a checkpoint holds."""
    from manyinone.io.checkpoint import read_index

    index = read_index(ckpt)
    table = Table(title=f"{ckpt} ({index['adapter']}, {index['model_type']})")
    for col in ("spec", "params", "GFLOPs/token", "rel. params", "rel. FLOPs"):
        table.add_column(col, justify="right")
    for e in index["specs"]:
        rel = e["relative"]
        table.add_row(",".join(f"{k}={v}" for k, v in e["spec"].items()), f"{e['params']:,}",
                      f"{e['flops_per_token'] / 1e9:.3f}", f"{rel['params']:.3f}", f"{rel['flops']:.3f}")
    console.print(table)
    console.print(f"budgets resolve by relative {index['metric']}: budget b -> largest spec with cost <= b")
    for entry in index.get("routed") or []:
        typer.echo(f"routed plan for budget {entry['budget']}: cost {entry['relative']:.3f}")
    for entry in index.get("token_routed") or []:
        shares = ", ".join(f"{u:.2f}" for u in entry["usage"])
        typer.echo(f"token-routed budget: average cost {entry['average']:.3f} over its calibration tokens, "
                   f"{len(entry['plans'])} plans (token shares {shares})")


@app.command(name="eval")
@_friendly
def eval_(
    ckpt: str = typer.Argument(..., help="checkpoint folder, or any model source with --exits"),
    data: str = typer.Option(..., help=".json/.jsonl/.parquet/.csv file, HF dataset name or folder, or 'demo'"),
    rows: Optional[str] = typer.Option(None, help="record slice START:END, e.g. 1800:2000"),
    exits: Optional[str] = typer.Option(None, help="exits to score when CKPT is not a manyinone checkpoint"),
    template: Optional[str] = typer.Option(None, help="alpaca or chat (default: the template the checkpoint was "
                                                      "trained with)"),
    max_length: int = typer.Option(512),
    batch_size: int = typer.Option(8),
    output: Optional[Path] = typer.Option(None, help="folder for eval.json and eval.png (default: CKPT, or runs/eval)"),
    device: str = typer.Option("auto"),
    text: Optional[Path] = typer.Option(None, help="raw text file (e.g. WikiText-2 test): perplexity per exit"),
    text_blocks: Optional[int] = typer.Option(None, help="score only the first N blocks of --text"),
    qa: Optional[Path] = typer.Option(None, help="QA .jsonl (question, golden_answers): greedy exact match per exit"),
    qa_limit: Optional[int] = typer.Option(None, help="score only the first N questions of --qa"),
    gen_prompts: int = typer.Option(0, help="agreement on generations: the full depth greedily continues the first "
                                            "N prompts; each exit's top-1 agreement and KL to full on those tokens"),
    gen_tokens: int = typer.Option(128, help="new tokens per prompt for --gen-prompts"),
) -> None:
    """Per-exit table: held-out loss, perplexity, top-1 agreement and KL to full, relative cost;
    optionally raw-text perplexity (--text), closed-book QA exact match (--qa) and agreement on the
    full depth's own generations (--gen-prompts)."""
    from manyinone.eval.session import load_for_eval
    from manyinone.train.data import load_records, tokenize_records
    from manyinone.eval.evaluate import evaluate_exits, write_report

    _in_range(batch_size, 1, 2**20, "--batch-size")
    _in_range(max_length, 9, 2**20, "--max-length")
    _at_least(gen_prompts, 0, "--gen-prompts")
    _at_least(gen_tokens, 1, "--gen-tokens")
    nested, space, costs, dev = load_for_eval(ckpt, _int_list(exits, "exits"), device)
    template = template or ((getattr(nested, "index", None) or {}).get("train") or {}).get("template", "alpaca")
    records = load_records(data, rows)
    examples = tokenize_records(records, nested.tokenizer, max_length, template)
    result = evaluate_exits(nested.adapter, space, examples, nested.tokenizer.pad_token_id, batch_size, dev,
                            costs, show_progress=sys.stderr.isatty(), logits_for=nested.exit_logits)
    extra_cols = _extra_metrics(result, nested, space, dev, template, max_length, batch_size, text, text_blocks, qa, qa_limit)
    if gen_prompts:
        extra_cols.update(_generation_agreement(result, nested, space, dev, records[:gen_prompts], template,
                                                gen_tokens, batch_size))
    table = Table(title=f"{ckpt} on {data} {rows or ''}")
    for col in ("exit", "rel. cost", "loss", "ppl", "top-1 agree", "KL to full", *extra_cols.values()):
        table.add_column(col, justify="right")
    for r in result:
        cost = f"{r['relative_cost']:.3f}" if r["relative_cost"] is not None else "-"
        table.add_row(r["spec"], cost, f"{r['loss']:.3f}", f"{r['perplexity']:.2f}",
                      f"{r['top1_agreement']:.3f}", f"{r['kl_to_full']:.3f}",
                      *(f"{r[key]:.3f}" if key != "text_ppl" else f"{r[key]:.2f}" for key in extra_cols))
    console.print(table)
    # Reports go beside a manyinone checkpoint; never into someone else's model folder.
    default = Path(ckpt) if (Path(ckpt) / "manyinone.json").is_file() else Path("runs/eval")
    out = write_report(result, output or default, title=str(ckpt))
    console.print(f"wrote {out / 'eval.json'} and {out / 'eval.png'}")


def _generation_agreement(rows, nested, space, device, records, template, new_tokens, batch_size) -> dict[str, str]:
    """Per exit: top-1 agreement and KL to full on the full depth's own greedy continuations."""
    from manyinone.train.data import encode_prompt
    from manyinone.eval.evaluate import add_generation_agreement, evaluate_exits, generation_examples
    from manyinone.runtime.generate import Runtime

    runtime = Runtime.from_nested(nested)
    prompts = [encode_prompt(r, nested.tokenizer, template) for r in records]
    examples = generation_examples(lambda chunk: runtime.generate(chunk, None, new_tokens).tokens, prompts,
                                   max(batch_size, 16))
    if not examples:  # a model that always stops at once has nothing to agree on
        console.print("[yellow]--gen-prompts: the full depth stopped at once on every prompt; no agreement columns[/]")
        return {}
    scored = evaluate_exits(nested.adapter, space, examples, nested.tokenizer.pad_token_id, batch_size, device,
                            logits_for=nested.exit_logits, show_progress=sys.stderr.isatty())
    add_generation_agreement(rows, scored)
    return {"gen_agreement": "gen agree", "gen_kl": "gen KL"}


def _extra_metrics(rows, nested, space, device, template, max_length, batch_size, text, text_blocks, qa, qa_limit
                   ) -> dict[str, str]:
    """Add raw-text perplexity and QA scores to each exit's row; returns key -> column title."""
    from manyinone.eval.evaluate import evaluate_exits
    from manyinone.eval.tasks import qa_scores, read_qa, text_examples

    columns: dict[str, str] = {}
    if text is not None:
        if text_blocks is not None:
            _at_least(text_blocks, 1, "--text-blocks")
        blocks = text_examples(text, nested.tokenizer, max_length, text_blocks)
        scored = evaluate_exits(nested.adapter, space, blocks, nested.tokenizer.pad_token_id, batch_size, device,
                                logits_for=nested.exit_logits, show_progress=sys.stderr.isatty())
        for row, s in zip(rows, scored):
            row["text_ppl"], row["text_file"] = s["perplexity"], str(text)
        columns["text_ppl"] = f"{text.name} ppl"
    if qa is not None:
        if qa_limit is not None:
            _at_least(qa_limit, 1, "--qa-limit")
        scores = qa_scores(nested, space, read_qa(qa, qa_limit), template, max(batch_size, 8), device=device,
                           show_progress=sys.stderr.isatty())
        for row in rows:
            row.update(scores[row["spec"]])
        columns.update({"qa_em": "QA EM", "qa_contains": "QA contains"})
    return columns


@app.command()
@_friendly
def generate(
    ckpt: Path = typer.Argument(..., help="checkpoint folder"),
    prompt: str = typer.Option(..., help="instruction text"),
    budget: Optional[float] = typer.Option(None, help="fraction of the full cost (default: full model)"),
    max_new_tokens: int = typer.Option(64),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    top_p: float = typer.Option(0.9),
    template: Optional[str] = typer.Option(None, help="alpaca or chat (default: the training template)"),
    seed: int = typer.Option(0),
    speculative: bool = typer.Option(False, help="self-speculative decoding in the runtime (same output when greedy)"),
    draft_exit: Optional[int] = typer.Option(None, help="draft exit depth (default: the tuned policy)"),
    draft_tokens: Optional[int] = typer.Option(None, help="longest draft, 1..16"),
    draft_threshold: Optional[float] = typer.Option(None, help="stop a draft when the exit's top-1 probability "
                                                               "falls below this, 0 < t < 1"),
    adaptive_draft: Optional[bool] = typer.Option(None, "--adaptive-draft/--fixed-draft",
                                                  help="choose the draft exit and length per round"),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16"),
    device: str = typer.Option("auto"),
    every_budget: bool = typer.Option(False, "--every-budget", help="answer greedily at every budget of the index, "
                                                                    "cheapest first, with each one's tokens/s"),
) -> None:
    """Sample text from the sub-model that fits the budget (with --speculative: from the full budget-indexed
    checkpoint, drafting with a shallow exit and verifying with the rest; with --every-budget: the trade-off)."""
    from manyinone.eval.session import answers_at_every_budget, generate_speculative, generate_text

    _at_least(max_new_tokens, 1, "--max-new-tokens")
    if every_budget:
        if budget is not None:
            raise ManyinoneError("--every-budget answers at every budget; leave out --budget")
        from rich.markup import escape

        table = Table(title=f"{escape(prompt)}  (greedy, {max_new_tokens} new tokens at most)")
        for col, justify in (("sub-model", "left"), ("rel. cost", "right"), ("tokens/s", "right"), ("answer", "left")):
            table.add_column(col, justify=justify)
        for row in answers_at_every_budget(ckpt, prompt, max_new_tokens, template):
            table.add_row(row["spec"], f"{row['relative_cost']:.2f}", f"{row['tokens_per_s']:.1f}",
                          escape(row["text"].strip().replace("\n", " ")))
        console.print(table)
        return
    _in_range(seed, 0, 2**64 - 1, "--seed")  # what torch.manual_seed takes
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ManyinoneError(f"--temperature {temperature} out of range; allowed a finite number >= 0 (0 = greedy)")
    if not 0 < top_p <= 1:  # false for nan too
        raise ManyinoneError(f"--top-p {top_p} out of range; allowed 0 < top_p <= 1")
    draft = {"draft_depth": draft_exit, "draft_tokens": draft_tokens, "draft_threshold": draft_threshold,
             "adaptive_draft": adaptive_draft}
    given = [f"--{k.replace('_', '-').replace('depth', 'exit')}" for k, v in draft.items() if v is not None]
    if given and not speculative:
        raise ManyinoneError(f"{', '.join(given)} need --speculative")
    if speculative:
        text, spec, stats = generate_speculative(ckpt, prompt, budget, max_new_tokens, temperature, top_p, template,
                                                 seed, draft, dtype, device)
        console.print(f"[dim]({spec.label}; {stats['accepted']}/{stats['drafted']} drafted tokens accepted, "
                      f"{stats['rounds']} rounds)[/]")
        typer.echo(text)
        return
    text, spec = generate_text(ckpt, prompt, budget, max_new_tokens, temperature, top_p, template, seed, dtype, device)
    console.print(f"[dim]({spec.label})[/]")
    typer.echo(text)


@app.command()
@_friendly
def serve(
    ckpt: Path = typer.Argument(..., help="checkpoint folder"),
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8000),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16"),
    device: str = typer.Option("auto"),
    max_len: Optional[int] = typer.Option(None, help="context limit in tokens (default: min(model's, 2048))"),
    max_batch: int = typer.Option(16, help="most prompts in one request (more: 413)"),
    max_cache_mib: float = typer.Option(4096.0, help="KV-cache memory kept for all batch sizes together, MiB "
                                                     "(a request needing more: 413)"),
    api_key: Optional[str] = typer.Option(None, envvar="MANYINONE_API_KEY",
                                          help="require `Authorization: Bearer KEY` (401 without it); /health stays open"),
    draft_exit: Optional[int] = typer.Option(None, help="default draft exit of speculative requests"),
    draft_tokens: Optional[int] = typer.Option(None, help="default longest draft, 1..16"),
    draft_threshold: Optional[float] = typer.Option(None, help="default draft confidence threshold, 0 < t < 1"),
    adaptive_draft: Optional[bool] = typer.Option(None, "--adaptive-draft/--fixed-draft",
                                                  help="default: choose the draft exit and length per round"),
    batch_rows: int = typer.Option(16, help="rows of the continuous batch plain requests share (0: one request "
                                            "at a time)"),
    fused: bool = typer.Option(False, "--fused/--eager", help="compile each decode step into one CUDA graph "
                                                              "(CUDA; the first request of each shape compiles)"),
) -> None:
    """OpenAI-compatible server (/v1/completions, /v1/chat/completions) with per-request `budget` and
    `speculative` fields. Needs `pip install 'manyinone\\[serve]'`."""  # \\[: rich would read [serve] as markup
    from manyinone.runtime.server import serve as run_server

    if max_len is not None:
        _at_least(max_len, 2, "--max-len")
    draft = {"draft_depth": draft_exit, "draft_tokens": draft_tokens, "draft_threshold": draft_threshold,
             "adaptive_draft": adaptive_draft}
    _at_least(batch_rows, 0, "--batch-rows")
    run_server(str(ckpt), host, port, dtype, device, max_len, max_batch=max_batch, max_cache_mib=max_cache_mib,
               api_key=api_key, batch_rows=batch_rows or None, fused=fused, draft=draft)


@app.command(name="distill-data")
@_friendly
def distill_data(
    teacher: str = typer.Option(..., help="the model that writes the responses: HF folder, .gguf, alias or run folder"),
    output: Path = typer.Option(..., "--output", "-o", help="JSONL file to write (Alpaca records)"),
    data: str = typer.Option("demo", help="prompts: .json/.jsonl file, HF dataset name or 'demo'"),
    rows: Optional[str] = typer.Option(None, help="record slice START:END, e.g. 0:1800"),
    template: str = typer.Option("alpaca", help="alpaca or chat: the prompt format training uses"),
    samples: int = typer.Option(4, help="responses per prompt"),
    temperature: float = typer.Option(0.8, help="sampling temperature (0 = greedy: one distinct sample)"),
    top_p: float = typer.Option(0.95),
    max_new_tokens: int = typer.Option(256),
    batch_size: int = typer.Option(64, help="prompts sampled together"),
    seed: int = typer.Option(0),
    dtype: str = typer.Option("bfloat16", help="float32, bfloat16 or float16"),
    device: str = typer.Option("auto"),
) -> None:
    """Sample responses from a teacher on the training prompts into a resumable JSONL dataset
    (run the same command again to resume); train mixes it in with --set mix_data=FILE."""
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from manyinone.train.data import load_records
    from manyinone.train.distill_data import SampleSettings, distill_dataset, runtime_sampler
    from manyinone.io.loading import load_pretrained
    from manyinone.runtime.generate import dtype_named
    from manyinone.runtime.sampling import Sampling
    from manyinone.core.device import pick_device

    for value, name in ((samples, "--samples"), (max_new_tokens, "--max-new-tokens"), (batch_size, "--batch-size")):
        _at_least(value, 1, name)
    Sampling(temperature, top_p, seed)  # bad temperature / top-p / seed: refused before any weights load
    records = load_records(data, rows)
    settings = SampleSettings(teacher, data, rows, template, samples, temperature, top_p, max_new_tokens, batch_size,
                              seed)
    weights = dtype_named(dtype)
    dev = pick_device(device)
    model, tokenizer = load_pretrained(teacher, dtype=weights)
    tokens = [0]
    sample = runtime_sampler(model.to(dev), tokenizer, template, max_new_tokens, temperature, top_p,
                             counter=lambda n: tokens.__setitem__(0, tokens[0] + n), records=records,
                             batch_size=batch_size)
    started = time.perf_counter()
    with Progress(TextColumn("[bold]distill-data"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[speed]}"),
                  TimeElapsedColumn(), console=Console(stderr=True), disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task("sample", total=len(records) * samples, speed="")
        path, written = distill_dataset(
            output, settings, records, sample,
            lambda done, total: bar.update(task, completed=done,
                                           speed=f"{tokens[0] / (time.perf_counter() - started):,.0f} tok/s"))
    seconds = time.perf_counter() - started
    console.print(f"wrote {path}: {written} new records, {tokens[0]:,} tokens sampled in {seconds:.0f} s "
                  f"({tokens[0] / max(seconds, 1e-9):,.0f} tok/s)")


@app.command(name="tune-speculative")
@_friendly
def tune_speculative(
    ckpt: Path = typer.Argument(..., help="checkpoint folder (the choice is written into its manyinone.json)"),
    data: str = typer.Option("demo", help="prompts: .json/.jsonl file, HF dataset name or 'demo'"),
    rows: Optional[str] = typer.Option(None, help="record slice START:END"),
    prompts: int = typer.Option(4, help="how many prompts to time"),
    max_new_tokens: int = typer.Option(64),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16"),
    device: str = typer.Option("auto"),
) -> None:
    """Time self-speculative decoding per (draft exit, draft length) and store the fastest in the checkpoint."""
    from manyinone.runtime import Runtime
    from manyinone.runtime.generate import dtype_named
    from manyinone.runtime.tune import autotune, instruction_prompts, store_choice

    torch_dtype = dtype_named(dtype)
    _at_least(prompts, 1, "--prompts")
    _at_least(max_new_tokens, 2, "--max-new-tokens")
    runtime = Runtime.open(ckpt, dtype=torch_dtype, device=device)
    choice = autotune(runtime, instruction_prompts(runtime, data, rows, prompts), max_new_tokens)
    table = Table(title=f"self-speculation on {ckpt} (plain greedy: {choice['baseline_tokens_per_s']:.1f} tok/s)")
    for col in ("draft exit", "draft length", "threshold", "tokens/s", "acceptance", "tokens/round"):
        table.add_column(col, justify="right")
    for t in choice["trials"]:
        table.add_row("adaptive" if t.get("adaptive") else str(t["draft_depth"]), str(t["draft_tokens"]),
                      str(t.get("draft_threshold") or "-"), f"{t['tokens_per_s']:.1f}", f"{t['acceptance']:.2f}",
                      f"{t['tokens_per_round']:.2f}")
    console.print(table)
    store_choice(ckpt, choice)
    what = "the adaptive policy" if choice["adaptive"] else f"draft exit {choice['draft_depth']}"
    threshold = f", threshold {choice['threshold']}" if choice.get("threshold") else ""
    console.print(f"chose {what}, up to {choice['draft_tokens']} tokens{threshold} ({choice['speedup']:.2f}x); "
                  f"written to {ckpt / 'manyinone.json'}")


def main() -> None:  # pragma: no cover - `python -m manyinone`
    app()
