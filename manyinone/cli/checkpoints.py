"""Commands over a written checkpoint: export a budget, route, time, verify, describe."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from manyinone.core.errors import ManyinoneError
from manyinone.cli.app import _at_least, _friendly, app, console


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
