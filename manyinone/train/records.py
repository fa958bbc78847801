"""Training records from where users keep them, checked row by row.

Three row formats (one per source, chosen by the first row's keys):
- alpaca:   {"instruction", "input"?, "output"}: one prompt, one supervised response;
- messages: {"messages": [{"role", "content"}, ...]}: a multi-turn chat, loss on assistant turns only;
- text:     {"text"}: raw text, every token supervised (continued pretraining, distillation text).

Sources: `.json` / `.jsonl` (read by hand: `datasets`' Arrow conversion coerces types, which would
hide the bad row), `.parquet` and `.csv` (through `datasets`; CSV columns are read as strings), a
hub dataset (`subset`, `split`), or `demo`. `columns` maps the format's fields to a source's own
column names, e.g. {"instruction": "question", "output": "answer"}. Every row is then checked by
hand, and an error names the row as numbered in the source and what is wrong with it.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any

from manyinone.core.errors import ManyinoneError, first_line

DEMO = "demo"
FORMATS = ("alpaca", "messages", "text")
FIELDS = ("instruction", "input", "output", "messages", "text")  # what `columns` may map to
ROLES = ("system", "user", "assistant", "developer", "tool")
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")


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


def is_unicode(text: str) -> bool:
    """False for strings no tokenizer accepts: lone surrogates (JSON "\\ud800", undecodable argv bytes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def row_format(row: Any) -> str:
    """The format a row's keys name: messages, text (a `text` key without alpaca's), else alpaca."""
    if isinstance(row, dict) and "messages" in row:
        return "messages"
    if isinstance(row, dict) and "text" in row and "instruction" not in row and "output" not in row:
        return "text"
    return "alpaca"


def _text_field(row: dict, key: str, source: str, i: int, hint: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        what = "missing" if value is None else f"not a non-empty string ({value!r:.40})"
        raise ManyinoneError(f"{source}: row {i} field {key!r} is {what}; {hint}")
    if not is_unicode(value):
        raise ManyinoneError(f"{source}: row {i} field {key!r} is not valid Unicode (it holds a lone surrogate, "
                             "e.g. JSON \\ud800); fix the text")
    return value


def _alpaca(row: dict, source: str, i: int) -> dict[str, str]:
    hint = "rows need instruction, output (and optional input)"
    instruction, output = (_text_field(row, k, source, i, hint) for k in ("instruction", "output"))
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise ManyinoneError(f"{source}: row {i} field 'input' is {type(extra).__name__}, expected a string")
    if extra and not is_unicode(extra):
        raise ManyinoneError(f"{source}: row {i} field 'input' is not valid Unicode (it holds a lone surrogate, "
                             "e.g. JSON \\ud800); fix the text")
    return {"instruction": instruction, "input": extra or "", "output": output}


def _messages(row: dict, source: str, i: int) -> dict[str, list[dict[str, str]]]:
    turns = row["messages"]
    if not isinstance(turns, list) or not turns:
        raise ManyinoneError(f"{source}: row {i} field 'messages' is {type(turns).__name__ if turns else 'empty'}; "
                             "expected a non-empty list of {role, content} objects")
    clean = []
    for j, turn in enumerate(turns):
        where = f"{source}: row {i} message {j}"
        if not isinstance(turn, dict):
            raise ManyinoneError(f"{where} is a {type(turn).__name__}, expected an object with role and content")
        if turn.get("role") not in ROLES:
            raise ManyinoneError(f"{where} role {turn.get('role')!r:.40} unknown; allowed {list(ROLES)}")
        content = turn.get("content")
        if not isinstance(content, str) or (turn["role"] == "assistant" and not content.strip()):
            what = "missing" if content is None else f"not {'a non-empty' if turn['role'] == 'assistant' else 'a'} " \
                                                      f"string ({content!r:.40})"
            raise ManyinoneError(f"{where} content is {what}")
        if not is_unicode(content):
            raise ManyinoneError(f"{where} content is not valid Unicode (it holds a lone surrogate); fix the text")
        clean.append({"role": turn["role"], "content": content})
    if not any(t["role"] == "assistant" for t in clean):
        raise ManyinoneError(f"{source}: row {i} has no assistant message; the loss is on assistant turns, "
                             "so every row needs one")
    return {"messages": clean}


def validate_records(records: list[Any], source: str, first_row: int = 0) -> list[dict[str, Any]]:
    """Rows checked and reduced to their format's fields; the format is the first row's.

    Errors name the row as numbered in the source (`first_row` is the index of records[0]).
    """
    clean: list[dict[str, Any]] = []
    fmt = row_format(records[0]) if records else "alpaca"
    for i, row in enumerate(records, start=first_row):
        if not isinstance(row, dict):
            raise ManyinoneError(f"{source}: row {i} is a {type(row).__name__}, expected an object with "
                                 "instruction/input/output, messages or text")
        if row_format(row) != fmt:
            raise ManyinoneError(f"{source}: row {i} is a {row_format(row)} row but row {first_row} is {fmt}; "
                                 "keep one format per source")
        if fmt == "alpaca":
            clean.append(_alpaca(row, source, i))
        elif fmt == "messages":
            clean.append(_messages(row, source, i))
        else:
            clean.append({"text": _text_field(row, "text", source, i, "text rows need a non-empty string 'text'")})
    return clean


def records_format(records: list[dict[str, Any]]) -> str:
    """The format of already validated records (one per source)."""
    return row_format(records[0]) if records else "alpaca"


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


def read_table_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a .parquet or .csv file through `datasets`. CSV cells stay the strings they are
    (every column is read as a string, an empty cell as ""), so "007" is not turned into 7."""
    import datasets

    datasets.disable_progress_bars()
    try:
        if path.suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as f:
                header = next(csv.reader(f), None)
            if not header:
                raise ManyinoneError(f"{path}: empty CSV file; expected a header row, e.g. instruction,input,output")
            features = datasets.Features({name: datasets.Value("string") for name in header})
            table = datasets.load_dataset("csv", data_files=str(path), split="train", features=features,
                                          keep_default_na=False)
        else:
            table = datasets.load_dataset("parquet", data_files=str(path), split="train")
    except ManyinoneError:
        raise
    except UnicodeDecodeError:
        raise ManyinoneError(f"data file {str(path)!r} is not UTF-8 text") from None
    except Exception as exc:
        raise ManyinoneError(f"{path}: cannot read as {path.suffix[1:]} ({first_line(exc)})") from None
    return table.to_list()


def read_hub_rows(name: str, subset: str | None, split: str) -> list[dict[str, Any]]:
    """Rows of a dataset on the hub (or in the local `datasets` cache): its `subset` and `split`."""
    import datasets

    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(name, subset, split=split).to_list()
    except Exception as exc:
        what = f"{name!r}" + (f" subset {subset!r}" if subset else "") + f" split {split!r}"
        raise ManyinoneError(f"cannot load dataset {what}: {first_line(exc)}") from None


def map_columns(rows: list[Any], columns: dict[str, str] | None, source: str) -> list[Any]:
    """Rename a source's columns to the format's fields: {"instruction": "question"} reads `question`."""
    if not columns:
        return rows
    bad = [k for k in columns if k not in FIELDS]
    if bad:
        raise ManyinoneError(f"data_columns key {bad[0]!r} unknown; allowed {list(FIELDS)} (each maps to a column "
                             "of the source)")
    first = rows[0] if rows and isinstance(rows[0], dict) else {}
    missing = [c for c in columns.values() if c not in first]
    if rows and missing:
        raise ManyinoneError(f"{source}: data_columns names column {missing[0]!r}, which the source lacks; "
                             f"its columns: {sorted(first)}")
    renamed = set(columns.values())
    out = []
    for row in rows:
        if not isinstance(row, dict):
            out.append(row)  # validate_records names it
            continue
        kept = {k: v for k, v in row.items() if k not in renamed and k not in columns}
        out.append({**kept, **{ours: row.get(theirs) for ours, theirs in columns.items()}})
    return out


def load_records(source: str, rows: str | None = None, subset: str | None = None, split: str = "train",
                 columns: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Records from `source`, columns renamed by `columns`, sliced by `rows` ('START:END'), validated."""
    selector = parse_rows(rows)
    path = Path(source)
    if source == DEMO:
        records: list[Any] = demo_records()
    elif path.suffix in LOCAL_SUFFIXES:
        if path.is_dir():
            raise ManyinoneError(f"data file {source!r} is a folder; expected one of {list(LOCAL_SUFFIXES)}")
        if not path.is_file():
            raise ManyinoneError(f"data file {source!r} not found")
        try:
            records = read_json_rows(path) if path.suffix in (".json", ".jsonl") else read_table_rows(path)
        except UnicodeDecodeError:
            raise ManyinoneError(f"data file {source!r} is not UTF-8 text") from None
    elif path.is_dir():  # a dataset folder `datasets` reads (data files, or a README's configs)
        records = read_hub_rows(source, subset, split)
    elif path.exists():
        raise ManyinoneError(f"data {source!r}: expected a {'/'.join(LOCAL_SUFFIXES)} file, an HF dataset name "
                             f"or {DEMO!r}")
    else:
        records = read_hub_rows(source, subset, split)
    records = map_columns(records, columns, source)
    first_row = selector.indices(len(records))[0]
    records = validate_records(records[selector], source, first_row)
    if not records:
        raise ManyinoneError(f"data {source!r} rows {rows!r}: no records selected")
    return records
