"""Instruction data: sources, validation with row numbers, prompt masking, truncation, batching."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch

from helpers import CHAT_TEMPLATE, EOS_ID, PAD_ID
from manyinone.train.data import (
    ALPACA_PROMPT, IGNORE, Example, collate, demo_records, epoch_order, load_records, parse_rows,
    prompt_and_response, tokenize_records, validate_records,
)
from manyinone.core.errors import ManyinoneError

GOOD = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "Five."},
    {"instruction": "Say hello.", "output": "Hello!"},  # input is optional
    {"instruction": "Reverse the word.", "input": "stone", "output": "enots"},
]


def write_json(path, rows):
    path.write_text(json.dumps(rows))
    return str(path)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# --- demo ---------------------------------------------------------------------------------------------
def test_demo_records_are_valid_deterministic_and_correct():
    records = demo_records()
    assert len(records) == 400 and records == demo_records()
    assert validate_records(records, "demo") == records
    assert all(set(r) == {"instruction", "input", "output"} for r in records)
    for r in records[0::4]:  # arithmetic
        a, b = map(int, re.fullmatch(r"What is (\d+) plus (\d+)\?", r["instruction"]).groups())
        assert r["output"] == f"{a} plus {b} is {a + b}."
    for r in records[1::4]:  # backwards
        assert r["output"] == f"{r['input']} backwards is {r['input'][::-1]}."
    for r in records[2::4]:  # sorting
        xs = [int(x) for x in r["input"].split(", ")]
        assert r["output"] == ", ".join(map(str, sorted(xs)))
    for r in records[3::4]:  # capitals
        assert r["output"] == r["input"].upper()


def test_demo_rows_slice():
    assert load_records("demo", "10:13") == demo_records()[10:13]
    assert load_records("demo") == demo_records()


def test_demo_empty_slice_is_an_error():
    with pytest.raises(ManyinoneError, match="no records selected"):
        load_records("demo", "500:600")


# --- files --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("writer, suffix", [(write_json, "json"), (write_jsonl, "jsonl")])
def test_json_and_jsonl_files_load(tmp_path, writer, suffix):
    path = writer(tmp_path / f"data.{suffix}", GOOD)
    records = load_records(path)
    assert records == [{"input": "", **r} for r in GOOD]
    assert load_records(path, "1:3") == records[1:3]
    assert load_records(path, ":1") == records[:1]
    assert load_records(path, "-1:") == records[-1:]


def test_extra_fields_are_dropped(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{**r, "id": i, "source": "x"} for i, r in enumerate(GOOD)])
    assert all(set(r) == {"instruction", "input", "output"} for r in load_records(path))


def test_empty_selection_from_a_file(tmp_path):
    path = write_json(tmp_path / "d.json", GOOD)
    with pytest.raises(ManyinoneError, match="no records selected"):
        load_records(path, "10:20")


def test_unreachable_hub_dataset_is_a_clear_error():
    # HF_DATASETS_OFFLINE=1 (conftest): a hub name fails fast, as it does on a machine without network.
    with pytest.raises(ManyinoneError, match="cannot load dataset 'no-such-org/no-such-data'"):
        load_records("no-such-org/no-such-data")


@pytest.mark.parametrize("rows", ["abc", "1:x", "1:2:3"])
def test_malformed_rows(rows):
    with pytest.raises(ManyinoneError, match=rf"rows '{re.escape(rows)}' malformed; expected START:END"):
        parse_rows(rows)


def test_parse_rows():
    assert parse_rows("0:1800") == slice(0, 1800)
    assert parse_rows("5:") == slice(5, None)
    assert parse_rows(None) == parse_rows("") == slice(None)


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(ManyinoneError, match="not found"):
        load_records(str(tmp_path / "nope.jsonl"))
    other = tmp_path / "data.txt"
    other.write_text("instruction,output\na,b\n")
    with pytest.raises(ManyinoneError, match="expected a .json/.jsonl/.parquet/.csv file"):
        load_records(str(other))


# --- malformed rows: the message names the row ------------------------------------------------------------
def _bad(rows, index, value):
    """GOOD with row `index` replaced by `value`."""
    rows = copy.deepcopy(rows)
    rows[index] = value
    return rows


@pytest.mark.parametrize("writer, suffix", [(write_json, "json"), (write_jsonl, "jsonl")])
@pytest.mark.parametrize("row, expected", [
    ({"instruction": "Say hi."}, r"row 2 field 'output' is missing"),
    ({"instruction": "   ", "output": "x"}, r"row 2 field 'instruction' is not a non-empty string"),
    ({"instruction": "Say hi.", "output": ""}, r"row 2 field 'output' is not a non-empty string"),
    ({"instruction": "Say hi.", "output": None}, r"row 2 field 'output' is missing"),
    ({"instruction": "Say hi.", "output": 5}, r"row 2 field 'output' is not a non-empty string \(5\)"),
    ({"instruction": ["a"], "output": "x"}, r"row 2 field 'instruction' is not a non-empty string"),
    ({"instruction": "Say hi.", "input": 3, "output": "x"}, r"row 2 field 'input' is int, expected a string"),
], ids=["missing-output", "blank-instruction", "empty-output", "null-output", "int-output", "list-instruction",
        "int-input"])
def test_malformed_row_is_named(tmp_path, writer, suffix, row, expected):
    path = writer(tmp_path / f"bad.{suffix}", _bad(GOOD, 2, row))
    with pytest.raises(ManyinoneError, match=expected) as err:
        load_records(path)
    assert path in str(err.value)
    assert "\n" not in str(err.value)


def test_row_that_is_not_an_object(tmp_path):
    with pytest.raises(ManyinoneError, match="row 1 is a str, expected an object"):
        validate_records([GOOD[0], "just text"], "mem")


def test_invalid_jsonl_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(GOOD[0]), json.dumps(GOOD[1]), '{"instruction": "x", "output":', json.dumps(GOOD[3])]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ManyinoneError, match=r"row 2 is not valid JSON"):
        load_records(str(path))


def test_invalid_json_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[{"instruction": "x", "output": "y"},\n')
    with pytest.raises(ManyinoneError, match=r"not valid JSON .* at line"):
        load_records(str(path))


@pytest.mark.parametrize("text, kind", [('"hello"', "str"), ("42", "int")])
def test_non_list_json(tmp_path, text, kind):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ManyinoneError, match=f"expected a JSON list of records, got {kind}"):
        load_records(str(path))


def test_single_object_json_is_not_a_list(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps(GOOD[0]))
    with pytest.raises(ManyinoneError, match="expected a JSON list of records, got dict"):
        load_records(str(path))


def test_wrong_type_is_blamed_on_the_right_row_when_others_look_numeric(tmp_path):
    rows = [{"instruction": "Add 5 and 7.", "output": "12"}, {"instruction": "Add 3 and 4.", "output": 7}]
    path = write_json(tmp_path / "numbers.json", rows)
    with pytest.raises(ManyinoneError, match=r"row 1 field 'output'"):
        load_records(path)


def test_row_number_is_the_files_not_the_slices(tmp_path):
    path = write_json(tmp_path / "bad.json", _bad(GOOD, 3, {"instruction": "x"}))
    with pytest.raises(ManyinoneError, match=r"row 3 field 'output' is missing"):
        load_records(path, "2:4")


# --- prompts and masking ----------------------------------------------------------------------------------
def test_alpaca_prompt_text(char_tokenizer):
    prompt, response = prompt_and_response(GOOD[0], char_tokenizer, "alpaca")
    assert prompt == ALPACA_PROMPT.format(ctx="", instruction="Name a colour.", input_block="")
    assert prompt.endswith("### Instruction:\nName a colour.\n\n### Response:\n")
    assert response == "Blue.</s>"
    with_input, _ = prompt_and_response({"input": "", **GOOD[1]}, char_tokenizer, "alpaca")
    assert "paired with an input" in with_input and "### Input:\n2 and 3\n\n### Response:\n" in with_input


def test_unknown_template(char_tokenizer):
    with pytest.raises(ManyinoneError, match=r"template 'vicuna' unknown; allowed \['alpaca', 'chat'\] or 'auto'"):
        prompt_and_response(GOOD[0], char_tokenizer, "vicuna")


@pytest.fixture
def chat_tokenizer(char_tokenizer):
    tok = copy.deepcopy(char_tokenizer)
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_prompt_tokens_are_masked(char_tokenizer, chat_tokenizer, template):
    tok = chat_tokenizer if template == "chat" else char_tokenizer
    records = validate_records(GOOD, "mem")
    examples = tokenize_records(records, tok, max_length=1024, template=template)
    assert len(examples) == len(records)
    for record, ex in zip(records, examples):
        prompt, response = prompt_and_response(record, tok, template)
        n_prompt = len(tok(prompt, add_special_tokens=template != "chat")["input_ids"])
        assert len(ex.input_ids) == len(ex.labels)
        assert ex.labels[:n_prompt] == [IGNORE] * n_prompt
        assert all(label != IGNORE for label in ex.labels[n_prompt:])
        assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
        # Character-level: the supervised tokens spell the response and the end-of-sequence token.
        assert tok.decode(ex.labels[n_prompt:-1]) == record["output"] and ex.labels[-1] == EOS_ID


def test_chat_prompt_uses_the_tokenizers_template(chat_tokenizer):
    record = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "Five."}
    prompt, _ = prompt_and_response(record, chat_tokenizer, "chat")
    assert prompt == "<s>user: Add the numbers.\n\n2 and 3\nassistant: "
    [ex] = tokenize_records([record], chat_tokenizer, max_length=1024, template="chat")
    first = ex.labels.index(next(label for label in ex.labels if label != IGNORE))
    assert chat_tokenizer.decode(ex.input_ids[:first]) == "<s>user: Add the numbers.\n\n2 and 3\nassistant: "


def test_truncation_keeps_prompt_and_part_of_the_response(char_tokenizer):
    record = validate_records([GOOD[0]], "mem")[0]
    prompt, _ = prompt_and_response(record, char_tokenizer, "alpaca")
    n_prompt = len(char_tokenizer(prompt)["input_ids"])
    [ex] = tokenize_records([record], char_tokenizer, max_length=n_prompt + 3)
    assert len(ex.input_ids) == len(ex.labels) == n_prompt + 3
    assert char_tokenizer.decode(ex.labels[n_prompt:]) == "Blu"


def test_truncation_drops_examples_without_a_response_token(char_tokenizer):
    records = validate_records([GOOD[0], {"instruction": "x" * 500, "output": "y"}], "mem")
    examples = tokenize_records(records, char_tokenizer, max_length=300)
    assert len(examples) == 1 and examples[0].labels[-1] == EOS_ID
    with pytest.raises(ManyinoneError, match="no example keeps a response token within max_length=20"):
        tokenize_records(records, char_tokenizer, max_length=20)


# --- batching ----------------------------------------------------------------------------------------------
def test_collate_right_pads():
    examples = [Example([5, 6, 7], [IGNORE, 6, 7]), Example([8, 9], [IGNORE, 9])]
    batch = collate(examples, pad_id=PAD_ID)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, PAD_ID]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, 9, IGNORE]]
    assert all(t.dtype == torch.long and t.shape == (2, 3) for t in batch.values())


def test_epoch_order_is_a_seeded_permutation():
    order = epoch_order(50, seed=1, epoch=0)
    assert sorted(order) == list(range(50))
    assert order == epoch_order(50, seed=1, epoch=0)
    assert order != epoch_order(50, seed=1, epoch=1) and order != epoch_order(50, seed=2, epoch=0)


def test_chat_template_missing_is_a_clear_error(char_tokenizer):
    assert char_tokenizer.chat_template is None
    with pytest.raises(ManyinoneError, match="chat"):
        prompt_and_response(validate_records([GOOD[0]], "mem")[0], char_tokenizer, "chat")
