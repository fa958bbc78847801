"""`manyinone train` and `manyinone distill-data`: the commands that write training runs and their data."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from manyinone.train.recipes import RECIPES
from manyinone.io.aliases import alias_help

from manyinone.cli.app import _at_least, _friendly, _int_list, app, console


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
                                         + "; ".join(f"{n}: {d}" for n, (d, *_) in RECIPES.items())),
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
    from manyinone.train.distributed import Runtime

    out = run_training(cfg, show_progress=not quiet)
    if Runtime.from_env().is_main:  # under torchrun, rank 0 speaks for the run
        console.print(f"checkpoint written to [bold]{out}[/] (metrics: {out / 'metrics.jsonl'})")


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
    text: Optional[Path] = typer.Option(None, help="raw-text file: prompts are prefixes of it (instead of --data), "
                                                   "rows are `text` records, prefix + continuation"),
    prefixes: int = typer.Option(1000, help="--text: how many prefixes"),
    prefix_tokens: int = typer.Option(64, help="--text: tokens per prefix"),
) -> None:
    """Sample responses from a teacher on the training prompts (or continuations of raw-text prefixes) into
    a resumable JSONL dataset (run the same command again to resume); train mixes it in with --set mix_data=FILE."""
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from manyinone.train.data import load_records
    from manyinone.core.errors import unreadable
    from manyinone.train.distill_data import SampleSettings, distill_dataset, runtime_sampler, text_prefixes
    from manyinone.io.loading import load_pretrained
    from manyinone.runtime.generate import dtype_named
    from manyinone.runtime.sampling import Sampling
    from manyinone.core.device import pick_device

    for value, name in ((samples, "--samples"), (max_new_tokens, "--max-new-tokens"), (batch_size, "--batch-size")):
        _at_least(value, 1, name)
    Sampling(temperature, top_p, seed)  # bad temperature / top-p / seed: refused before any weights load
    if text is not None:
        for value, name in ((prefixes, "--prefixes"), (prefix_tokens, "--prefix-tokens")):
            _at_least(value, 1, name)
        try:
            raw = text.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise unreadable("text file", text, exc) from None
        settings = SampleSettings(teacher, str(text), None, template, samples, temperature, top_p, max_new_tokens,
                                  batch_size, seed, prefix_tokens, prefixes)
    else:
        records = load_records(data, rows)
        settings = SampleSettings(teacher, data, rows, template, samples, temperature, top_p, max_new_tokens,
                                  batch_size, seed)
    weights = dtype_named(dtype)
    dev = pick_device(device)
    model, tokenizer = load_pretrained(teacher, dtype=weights)
    if text is not None:
        records = text_prefixes(raw, tokenizer, prefixes, prefix_tokens, seed)
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
