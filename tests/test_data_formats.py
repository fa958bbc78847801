"""Row formats (messages, text), table files (parquet, CSV), dataset folders with subsets and splits,
column mapping, and packing: each checked on the char tokenizer and through training on a tiny model."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from helpers import BOS_ID, EOS_ID, PAD_ID, build_tiny_model  # noqa: F401
from manyinone.core.errors import ManyinoneError
from manyinone.core.registry import adapter_for
from manyinone.io.loading import load_pretrained
from manyinone.train.config import TrainConfig
from manyinone.train.data import IGNORE, collate, load_records, pack, segments, tokenize_records
from manyinone.train.loop import train

# A template whose turns only append (like ChatML): the prompt of turn k is a prefix of the chat.
APPENDING_TEMPLATE = ("<s>{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
                      "{% if add_generation_prompt %}assistant: {% endif %}")

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}]


@pytest.fixture
def chat_tok(char_tokenizer):
    tok = copy.deepcopy(char_tokenizer)
    tok.chat_template = APPENDING_TEMPLATE
    return tok


def supervised_text(tok, ex) -> list[str]:
    """The supervised spans of an example, decoded."""
    spans, current = [], []
    for token, label in zip(ex.input_ids, ex.labels):
        if label != IGNORE:
            current.append(token)
        elif current:
            spans.append(tok.decode(current))
            current = []
    return spans + ([tok.decode(current)] if current else [])


# --- messages ------------------------------------------------------------------------------------------
def test_messages_loss_is_on_assistant_turns_only(chat_tok):
    [record] = load_records_from([{"messages": CHAT}])
    [ex] = tokenize_records([record], chat_tok, max_length=1024, template="chat")
    assert supervised_text(chat_tok, ex) == ["Hello.</s>\n", "4</s>\n"]
    whole = chat_tok.apply_chat_template(CHAT, tokenize=False)
    assert chat_tok.decode(ex.input_ids) == whole and ex.input_ids.count(BOS_ID) == 1  # the template's BOS only
    assert [lab for lab in ex.labels if lab != IGNORE] == [t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE]


def test_messages_prompt_for_generation_is_the_chat_before_the_last_answer(chat_tok):
    from manyinone.train.data import encode_prompt

    ids = encode_prompt({"messages": CHAT}, chat_tok, "chat")
    assert chat_tok.decode(ids) == chat_tok.apply_chat_template(CHAT[:4], tokenize=False, add_generation_prompt=True)


def test_messages_need_the_chat_template(char_tokenizer, chat_tok):
    with pytest.raises(ManyinoneError, match="messages rows are formatted by the tokenizer's chat template"):
        segments({"messages": CHAT}, chat_tok, "alpaca")
    with pytest.raises(ManyinoneError, match="need a tokenizer with a chat_template"):
        segments({"messages": CHAT}, char_tokenizer, "auto")


def test_a_template_that_rewrites_earlier_turns_is_refused(chat_tok):
    from helpers import CHAT_TEMPLATE  # "<s>" before every turn, generation prompt without it: not appending

    tok = copy.deepcopy(chat_tok)
    tok.chat_template = CHAT_TEMPLATE
    with pytest.raises(ManyinoneError, match="renders message 2 differently"):
        segments({"messages": CHAT}, tok, "chat")


@pytest.mark.parametrize("row, expected", [
    ({"messages": []}, r"row 1 field 'messages' is empty"),
    ({"messages": [{"role": "user", "content": "hi"}]}, r"row 1 has no assistant message"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, r"row 1 message 0 role 'robot' unknown"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}]},
     r"row 1 message 1 content is not a non-empty string \(5\)"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
     r"row 1 message 1 content is not a non-empty string"),
    ({"messages": "hello"}, r"row 1 field 'messages' is str"),
    ({"instruction": "x", "output": "y"}, r"row 1 is a alpaca row but row 0 is messages"),
])
def test_bad_messages_rows_are_named(tmp_path, row, expected):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [{"messages": CHAT}, row]))
    with pytest.raises(ManyinoneError, match=expected):
        load_records(str(path))


# --- text ----------------------------------------------------------------------------------------------
def test_text_rows_are_supervised_throughout_and_long_ones_become_windows(char_tokenizer):
    records = load_records_from([{"text": "abc"}, {"text": "x" * 25}])
    short, *windows = tokenize_records(records, char_tokenizer, max_length=10, template="auto")
    # The tokenizer's own special tokens (BOS where it adds one; this one adds none), the text, EOS.
    assert short.input_ids == [*char_tokenizer("abc")["input_ids"], EOS_ID]
    assert short.labels == short.input_ids
    x = char_tokenizer.convert_tokens_to_ids("x")
    assert [len(w.input_ids) for w in windows] == [10, 10, 6]  # 25 chars + EOS, nothing dropped
    assert sum((w.input_ids for w in windows), []) == [*char_tokenizer("x" * 25)["input_ids"], EOS_ID] == [x] * 25 + [EOS_ID]
    assert all(w.labels == w.input_ids for w in windows)


def test_text_rows_name_the_bad_row(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": 3}) + "\n")
    with pytest.raises(ManyinoneError, match=r"row 1 field 'text' is not a non-empty string \(3\)"):
        load_records(str(path))


# --- parquet, CSV, dataset folders, column mapping ----------------------------------------------------
ROWS = [{"instruction": "Add 5 and 7.", "input": "", "output": "12"},
        {"instruction": "Pad it.", "input": "7", "output": "007"}]


def write_parquet(path: Path, rows: list[dict]) -> str:
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return str(path)


def test_parquet_keeps_types_and_nested_messages(tmp_path):
    assert load_records(write_parquet(tmp_path / "a.parquet", ROWS)) == ROWS
    chats = load_records(write_parquet(tmp_path / "c.parquet", [{"messages": CHAT}]))
    assert chats == [{"messages": CHAT}]
    bad = write_parquet(tmp_path / "bad.parquet", [{"instruction": "x", "output": 1}, {"instruction": "y", "output": 2}])
    with pytest.raises(ManyinoneError, match=r"row 0 field 'output' is not a non-empty string \(1\)"):
        load_records(bad)


def test_csv_cells_stay_strings_and_a_bad_row_is_named(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text('instruction,input,output\n"Add 5 and 7.",,12\n"Pad it.",7,007\n')
    assert load_records(str(path)) == ROWS  # "007" is not coerced to 7, the empty input is ""
    path.write_text('instruction,input,output\n"Add 5 and 7.",,12\n"Pad it.",7,\n')
    with pytest.raises(ManyinoneError, match=r"row 1 field 'output' is not a non-empty string"):
        load_records(str(path))


def test_column_mapping(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"question": r["instruction"], "answer": r["output"], "id": i}) + "\n"
                            for i, r in enumerate(ROWS)))
    assert load_records(str(path), columns={"instruction": "question", "output": "answer"}) == \
        [{**r, "input": ""} for r in ROWS]
    with pytest.raises(ManyinoneError, match=r"data_columns names column 'query', which the source lacks; its columns"):
        load_records(str(path), columns={"instruction": "query", "output": "answer"})
    with pytest.raises(ManyinoneError, match=r"data_columns key 'prompt' unknown"):
        load_records(str(path), columns={"prompt": "question"})


def dataset_folder(root: Path) -> Path:
    """A dataset laid out like a hub repo: two subsets (configs) with train/test splits, in its README."""
    for subset in ("easy", "hard"):
        for split in ("train", "test"):
            (root / subset).mkdir(parents=True, exist_ok=True)
            rows = [{"q": f"{subset} {split} {i}", "a": f"answer {i}"} for i in range(3)]
            (root / subset / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    configs = "".join(f"- config_name: {s}\n  data_files:\n  - split: train\n    path: {s}/train.jsonl\n"
                      f"  - split: test\n    path: {s}/test.jsonl\n" for s in ("easy", "hard"))
    (root / "README.md").write_text(f"---\nconfigs:\n{configs}---\n")
    return root


def test_dataset_subset_split_and_columns(tmp_path):
    folder = str(dataset_folder(tmp_path / "ds"))
    records = load_records(folder, subset="hard", split="test", columns={"instruction": "q", "output": "a"})
    assert [r["instruction"] for r in records] == ["hard test 0", "hard test 1", "hard test 2"]
    with pytest.raises(ManyinoneError, match=r"cannot load dataset .* subset 'medium' split 'train'"):
        load_records(folder, subset="medium")


def load_records_from(rows):
    from manyinone.train.data import validate_records

    return validate_records(rows, "mem")


# --- packing -------------------------------------------------------------------------------------------
def test_pack_fills_rows_and_restarts_positions():
    examples = tokenize_like([5, 3, 4, 2])
    rows = pack(examples, max_length=8)
    assert sorted(len(r.input_ids) for r in rows) == [6, 8]  # 5+3 and 4+2
    for r in rows:
        assert r.positions[0] == 0 and len(r.positions) == len(r.input_ids) <= 8
    batch = collate(rows, PAD_ID)
    assert "attention_mask" not in batch and batch["position_ids"].shape == batch["input_ids"].shape
    assert batch["row_tokens"].tolist() == [len(r.input_ids) for r in rows]
    short = batch["position_ids"][1].tolist()
    assert short[-2:] == [0, 1]  # the padding tail is a segment of its own


def tokenize_like(lengths):
    from manyinone.train.data import Example

    return [Example([10 + i] * n, [IGNORE] + [10 + i] * (n - 1)) for i, n in enumerate(lengths)]


def per_example_losses(adapter, examples, packed: bool) -> list[tuple[int, float]]:
    """(depth, summed CE) of every example at every exit, from one packed row or from each example alone."""
    space = adapter.space({"depth": [2, 4]})
    batches = [collate(pack(examples, 4096), PAD_ID)] if packed else [collate([e], PAD_ID) for e in examples]
    losses = []
    for batch in batches:
        assert batch["input_ids"].shape[0] == 1
        extra = {"position_ids": batch["position_ids"]} if packed else {}
        hidden = adapter.forward_nested(batch["input_ids"], batch.get("attention_mask"), space.specs(), **extra)
        seq = batch["input_ids"].shape[1]
        # a packed row splits back into its examples where positions restart
        starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() if packed else [0]
        for spec in space.specs():
            logits = adapter.exit_logits(hidden[spec])[0, :-1]  # [seq-1, vocab]
            nll = torch.nn.functional.cross_entropy(logits, batch["labels"][0, 1:], reduction="none",
                                                    ignore_index=IGNORE)  # [seq-1]: predicts token t+1
            for a, b in zip(starts, starts[1:] + [seq]):
                losses.append((spec["depth"], float(nll[a:b - 1].sum())))  # the next example's first token: not its
    return sorted(losses)


def test_packed_losses_equal_each_example_alone(tiny_llama, char_tokenizer):
    model, tok = load_pretrained(str(tiny_llama))
    adapter = adapter_for(model.eval(), ["depth"])
    records = load_records("demo", "0:5")
    examples = tokenize_records(records, tok, max_length=1024, template="alpaca")
    with torch.no_grad():
        alone = per_example_losses(adapter, examples, packed=False)
        packed = per_example_losses(adapter, examples, packed=True)
    assert len(alone) == len(packed) == 2 * len(examples)
    for (da, a), (dp, p) in zip(alone, packed):
        assert da == dp and p == pytest.approx(a, rel=1e-5, abs=1e-4)


# --- every format through training ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_chat_llama(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    folder = build_tiny_model(tmp_path_factory.mktemp("tiny_chat"), "llama")
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = APPENDING_TEMPLATE
    tok.save_pretrained(folder)
    return folder


def _source(tmp_path: Path, kind: str) -> tuple[str, dict]:
    demo = load_records("demo", "0:8")
    if kind == "messages":
        rows = [{"messages": [{"role": "user", "content": r["instruction"] + " " + r["input"]},
                              {"role": "assistant", "content": r["output"]},
                              {"role": "user", "content": "Again."}, {"role": "assistant", "content": r["output"]}]}
                for r in demo]
        path = tmp_path / "chat.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path), {}
    if kind == "text":
        path = tmp_path / "text.jsonl"
        path.write_text("".join(json.dumps({"text": r["instruction"] + " " + r["output"]}) + "\n" for r in demo))
        return str(path), {}
    if kind == "parquet":
        return write_parquet(tmp_path / "a.parquet", demo), {}
    if kind == "csv":
        import csv

        path = tmp_path / "a.csv"
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
            w.writeheader()
            w.writerows(demo)
        return str(path), {}
    folder = dataset_folder(tmp_path / "ds")
    return str(folder), {"data_subset": "easy", "data_split": "test", "data_columns": {"instruction": "q", "output": "a"}}


@pytest.mark.parametrize("kind", ["messages", "text", "parquet", "csv", "dataset-folder"])
def test_each_format_trains_and_records_its_template(tiny_chat_llama, tmp_path, kind):
    data, extra = _source(tmp_path, kind)
    cfg = TrainConfig(model=str(tiny_chat_llama), exits=[2, 4], data=data, batch_size=2, max_length=160, lr=1e-3,
                      max_steps=2, output=str(tmp_path / "run"), **extra)
    run = train(cfg, show_progress=False)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(math.isfinite(x["ce/depth=4"]) for x in lines)
    import yaml

    saved = yaml.safe_load((run / "train_config.yaml").read_text())
    assert saved["template"] == "chat"  # auto, settled by the tokenizer's chat template and recorded
    index = json.loads((run / "manyinone.json").read_text())
    assert index["train"]["template"] == "chat"


def test_packed_training_step_equals_unpacked(tiny_llama, tmp_path):
    """One step over the same 4 examples: as 4 padded rows, or packed into one row. Same loss, same update."""
    from safetensors.torch import load_file

    common = dict(model=str(tiny_llama), exits=[2, 4], data="demo", rows="0:4", max_length=1024, lr=1e-3,
                  max_steps=1, template="alpaca")
    plain = train(TrainConfig(**common, batch_size=4, output=str(tmp_path / "plain")), show_progress=False)
    packed = train(TrainConfig(**common, batch_size=1, packing=True, output=str(tmp_path / "packed")),
                   show_progress=False)
    a, b = (json.loads((r / "metrics.jsonl").read_text()) for r in (plain, packed))
    for key in ("ce/depth=2", "ce/depth=4", "tokens"):
        assert b[key] == pytest.approx(a[key], rel=1e-5), key
    wa, wb = load_file(str(plain / "model.safetensors")), load_file(str(packed / "model.safetensors"))
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5


def test_packing_with_on_policy_is_refused():
    with pytest.raises(Exception, match="packing=true does not combine with on_policy_ratio"):
        TrainConfig(packing=True, on_policy_ratio=0.5, teacher="x")
