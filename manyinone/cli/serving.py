"""Commands that decode: `generate`, `serve` and `tune-speculative`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from manyinone.core.errors import ManyinoneError
from manyinone.cli.app import _at_least, _friendly, _in_range, app, console


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
    batch_rows: Optional[int] = typer.Option(None, help="rows of the continuous batch plain requests share (default: "
                                                     "up to 16, as many as --max-cache-mib holds; 0: one request "
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
    if batch_rows is not None:
        _at_least(batch_rows, 0, "--batch-rows")
    rows = "auto" if batch_rows is None else (batch_rows or None)
    run_server(str(ckpt), host, port, dtype, device, max_len, max_batch=max_batch, max_cache_mib=max_cache_mib,
               api_key=api_key, batch_rows=rows, fused=fused, draft=draft)


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
    fused: bool = typer.Option(False, "--fused/--eager", help="time compiled decode steps, as `serve --fused` "
                                                              "runs them (the policy is chosen on those timings)"),
) -> None:
    """Time self-speculative decoding per (draft exit, draft length) and store the fastest in the checkpoint."""
    from manyinone.runtime import Runtime
    from manyinone.runtime.generate import dtype_named
    from manyinone.runtime.tune import autotune, instruction_prompts, store_choice

    torch_dtype = dtype_named(dtype)
    _at_least(prompts, 1, "--prompts")
    _at_least(max_new_tokens, 2, "--max-new-tokens")
    runtime = Runtime.open(ckpt, dtype=torch_dtype, device=device, fused=fused)
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
