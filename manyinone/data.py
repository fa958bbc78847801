"""Instruction data: Alpaca-style records -> token ids with the prompt masked out of the loss.

Sources: a `.json` / `.jsonl` file, an HF `datasets` name, or
`demo`, a small instruction set generated here so the default job needs no download.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from manyinone.errors import ManyinoneError, first_line

IGNORE = -100  # label value skipped by the loss (prompt and padding positions)
DEMO = "demo"
TEMPLATES = ("alpaca", "chat")

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{ctx}. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


def parse_rows(rows: str | None) -> slice:
    """'0:1800' -> slice(0, 1800); None or '' -> everything."""
    if not rows:
        return slice(None)
    try:
        start, _, stop = rows.partition(":")
        return slice(int(start) if start else None, int(stop) if stop else None)
    except ValueError:
        raise ManyinoneError(f"rows {rows!r} malformed; expected START:END, e.g. 0:1800") from None


def demo_records(n: int = 400, seed: int = 0) -> list[dict[str, str]]:
    """A deterministic toy instruction set (arithmetic, word and list tasks) for offline runs."""
    rng = random.Random(seed)
    words = ["apple", "river", "stone", "cloud", "garden", "window", "silver", "forest", "candle", "planet"]
    records = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            records.append({"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} plus {b} is {a + b}."})
        elif kind == 1:
            w = rng.choice(words)
            records.append({"instruction": "Spell the word backwards.", "input": w, "output": f"{w} backwards is {w[::-1]}."})
        elif kind == 2:
            xs = rng.sample(range(1, 50), 5)
            records.append({"instruction": "Sort these numbers from smallest to largest.",
                            "input": ", ".join(map(str, xs)), "output": ", ".join(map(str, sorted(xs)))})
        else:
            ws = rng.sample(words, 3)
            records.append({"instruction": "Write the words in capital letters.", "input": " ".join(ws),
                            "output": " ".join(w.upper() for w in ws)})
    return records


def validate_records(records: list[Any], source: str, first_row: int = 0) -> list[dict[str, str]]:
    """Each row needs non-empty string `instruction` and `output`; `input` is an optional string.

    Errors name the row as numbered in the source (`first_row` is the index of records[0]).
    """
    clean = []
    for i, row in enumerate(records, start=first_row):
        if not isinstance(row, dict):
            raise ManyinoneError(f"{source}: row {i} is a {type(row).__name__}, expected an object with instruction/input/output")
        for key in ("instruction", "output"):
            value = row.get(key)
            if not isinstance(value, str) or not value.strip():
                what = "missing" if value is None else f"not a non-empty string ({value!r:.40})"
                raise ManyinoneError(f"{source}: row {i} field {key!r} is {what}; rows need instruction, output (and optional input)")
        extra = row.get("input")
        if extra is not None and not isinstance(extra, str):
            raise ManyinoneError(f"{source}: row {i} field 'input' is {type(extra).__name__}, expected a string")
        for key in ("instruction", "input", "output"):
            if not is_unicode(row.get(key) or ""):
                raise ManyinoneError(f"{source}: row {i} field {key!r} is not valid Unicode (it holds a lone surrogate, "
                                     "e.g. JSON \\ud800); fix the text")
        clean.append({"instruction": row["instruction"], "input": extra or "", "output": row["output"]})
    return clean


def read_json_rows(path: Path) -> list[Any]:
    """Rows of a local .json (a list) or .jsonl file, exactly as written.

    Read with the json module rather than `datasets`: its Arrow/pandas conversion coerces types
    (a numeric-looking string becomes an int), which would hide the real bad row from the checks.
    """
    text = path.read_text(encoding="utf-8", errors="strict")
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except (ValueError, RecursionError) as exc:  # also an int of >4300 digits, nesting too deep
                    raise ManyinoneError(f"{path}: row {i} is not valid JSON ({_json_reason(exc)})") from None
        return rows
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManyinoneError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (ValueError, RecursionError) as exc:
        raise ManyinoneError(f"{path}: not valid JSON ({_json_reason(exc)})") from None
    if not isinstance(rows, list):
        raise ManyinoneError(f"{path}: expected a JSON list of records, got {type(rows).__name__}")
    return rows


def _json_reason(exc: Exception) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return getattr(exc, "msg", None) or first_line(exc)


def load_records(source: str, rows: str | None = None) -> list[dict[str, str]]:
    """Records from `source`, sliced by `rows` ('START:END'), validated."""
    selector = parse_rows(rows)
    path = Path(source)
    if source == DEMO:
        records = demo_records()
    elif path.suffix in (".json", ".jsonl"):
        if path.is_dir():
            raise ManyinoneError(f"data file {source!r} is a folder; expected a .json/.jsonl file")
        if not path.is_file():
            raise ManyinoneError(f"data file {source!r} not found")
        try:
            records = read_json_rows(path)
        except UnicodeDecodeError:
            raise ManyinoneError(f"data file {source!r} is not UTF-8 text") from None
    elif path.exists():
        raise ManyinoneError(f"data {source!r}: expected a .json/.jsonl file, an HF dataset name or {DEMO!r}")
    else:
        import datasets

        datasets.disable_progress_bars()
        try:
            records = datasets.load_dataset(source, split="train").to_list()
        except Exception as exc:
            first = first_line(exc)
            raise ManyinoneError(f"cannot load dataset {source!r}: {first}") from None
    first_row = selector.indices(len(records))[0]
    records = validate_records(records[selector], source, first_row)
    if not records:
        raise ManyinoneError(f"data {source!r} rows {rows!r}: no records selected")
    return records


def is_unicode(text: str) -> bool:
    """False for strings no tokenizer accepts: lone surrogates (JSON "\\ud800", undecodable argv bytes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def prompt_and_response(record: dict[str, str], tokenizer, template: str) -> tuple[str, str]:
    """The prompt text (masked out of the loss) and the response text (+ EOS) for one record."""
    bad = next((v for v in record.values() if isinstance(v, str) and not is_unicode(v)), None)
    if bad is not None:
        raise ManyinoneError(f"text {bad!r:.40} is not valid Unicode (a lone surrogate, e.g. from bytes that are "
                             "not UTF-8); pass UTF-8 text")
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ManyinoneError("template 'chat' needs a tokenizer with a chat_template; this one has none, use alpaca")
        content = record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                               add_generation_prompt=True)
    elif template == "alpaca":
        ctx = ", paired with an input that provides further context" if record["input"] else ""
        block = f"### Input:\n{record['input']}\n\n" if record["input"] else ""
        prompt = ALPACA_PROMPT.format(ctx=ctx, instruction=record["instruction"], input_block=block)
    else:
        raise ManyinoneError(f"prompt template {template!r} unknown; allowed {list(TEMPLATES)}")
    return prompt, record["output"] + (tokenizer.eos_token or "")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE on prompt positions


def encode_prompt(record: dict[str, str], tokenizer, template: str) -> list[int]:
    """The prompt's token ids exactly as training sees them (a chat template brings its own BOS)."""
    prompt, _ = prompt_and_response(record, tokenizer, template)
    return tokenizer(prompt, add_special_tokens=template != "chat")["input_ids"]


def tokenize_records(records: list[dict[str, str]], tokenizer, max_length: int, template: str = "alpaca") -> list[Example]:
    """Tokenize prompt and response separately so the prompt is masked exactly; truncate to max_length."""
    examples = []
    for record in records:
        _, response = prompt_and_response(record, tokenizer, template)
        p = encode_prompt(record, tokenizer, template)
        r = tokenizer(response, add_special_tokens=False)["input_ids"]
        ids = (p + r)[:max_length]
        labels = ([IGNORE] * len(p) + r)[:max_length]
        if any(label != IGNORE for label in labels[1:]):  # keep only rows with a supervised token left
            examples.append(Example(ids, labels))
    if not examples:
        raise ManyinoneError(f"no example keeps a response token within max_length={max_length}; raise it")
    return examples


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask, labels, each [batch, seq]."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n], labels[row, :n], mask[row, :n] = torch.tensor(e.input_ids), torch.tensor(e.labels), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a pure function of (seed, epoch), so resume replays it."""
    g = torch.Generator().manual_seed(seed * 10_007 + epoch)
    return torch.randperm(n, generator=g).tolist()


def mixed_count(labelled: int, pool: int, ratio: float) -> int:
    """How many pool (generated) examples join each epoch so they make up `ratio` of it.

    ratio 0: none; ratio 1: the whole pool and no labelled example; otherwise
    round(labelled * ratio / (1 - ratio)), at most the pool's size.
    """
    if not 0 <= ratio <= 1:
        raise ManyinoneError(f"mix_ratio {ratio!r} out of range; allowed 0 <= mix_ratio <= 1")
    if ratio == 1:
        return pool
    return min(pool, round(labelled * ratio / (1 - ratio)))


def mixed_epoch_order(labelled: int, pool: int, per_epoch: int, ratio: float, seed: int, epoch: int) -> list[int]:
    """One epoch's example order over labelled examples [0, labelled) and pool examples
    [labelled, labelled + pool): every labelled one (none when ratio is 1) plus `per_epoch` pool
    examples. Successive epochs take successive slices of one seeded permutation of the pool, so
    several samples per prompt are all seen before any repeats. Pure in (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 10_007 + 7)
    pool_order = torch.randperm(pool, generator=g).tolist() if pool else []
    first = epoch * per_epoch
    chosen = [labelled + pool_order[(first + i) % pool] for i in range(per_epoch)] if pool else []
    members = ([] if ratio == 1 else list(range(labelled))) + chosen
    shuffle = epoch_order(len(members), seed, epoch)
    return [members[i] for i in shuffle]
