"""`manyinone eval`: per-exit quality of a checkpoint or any model source."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table


from manyinone.cli.app import _at_least, _friendly, _in_range, _int_list, app, console


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
                                            "N prompts; each exit's top-1 agreement, top-2 hits and KL to full on those tokens"),
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
                            costs, show_progress=sys.stderr.isatty(), logits_for=nested.exit_logits,
                            forward=nested.forward_nested)
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
                            logits_for=nested.exit_logits, forward=nested.forward_nested,
                            show_progress=sys.stderr.isatty())
    add_generation_agreement(rows, scored)
    return {"gen_agreement": "gen agree", "gen_top2": "gen top-2", "gen_kl": "gen KL"}


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
                                logits_for=nested.exit_logits, forward=nested.forward_nested,
                                show_progress=sys.stderr.isatty())
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
