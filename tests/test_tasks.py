"""Raw-text perplexity and closed-book QA per exit (manyinone.eval.tasks and `manyinone eval --text/--qa`)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import manyinone
from manyinone.cli import app
from manyinone.core.space import SubnetSpec
from manyinone.core.errors import ManyinoneError
from manyinone.eval.tasks import alias_contained, exact_match, normalize_answer, qa_scores, read_qa, text_examples

TEXT = "The cat sat on the mat. " * 20


def test_normalize_answer_follows_squad():
    assert normalize_answer("  The  Eiffel-Tower! ") == "eiffeltower"
    assert normalize_answer("An apple, a day") == "apple day"


def test_exact_match_and_contains_against_aliases():
    aliases = ["Mark Twain", "Samuel Clemens"]
    assert exact_match("mark twain.", aliases)
    assert not exact_match("It was Mark Twain", aliases)
    assert alias_contained("It was Mark Twain", aliases)
    assert not alias_contained("Twainian", aliases)  # whole words only
    assert not alias_contained("anything", ["the"])  # an alias that normalises to nothing never matches


def test_text_examples_cut_full_blocks_with_every_token_scored(tmp_path, char_tokenizer):
    path = tmp_path / "t.txt"
    path.write_text(TEXT)
    blocks = text_examples(path, char_tokenizer, block=50)
    assert len(blocks) == len(TEXT) // 50  # the partial tail block is dropped
    assert all(b.input_ids == b.labels and len(b.input_ids) == 50 for b in blocks)
    assert len(text_examples(path, char_tokenizer, block=50, max_blocks=2)) == 2
    with pytest.raises(ManyinoneError, match="fewer than one block"):
        text_examples(path, char_tokenizer, block=10_000)


def test_read_qa_rejects_malformed_rows(tmp_path):
    good = tmp_path / "qa.jsonl"
    good.write_text(json.dumps({"question": "q?", "golden_answers": ["a"]}) + "\n\n")
    assert read_qa(good) == [{"question": "q?", "golden_answers": ["a"]}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q?", "golden_answers": []}) + "\n")
    with pytest.raises(ManyinoneError, match="line 1: needs"):
        read_qa(bad)
    bad.write_text("{not json\n")
    with pytest.raises(ManyinoneError, match="line 1: not valid JSON"):
        read_qa(bad)


def test_text_perplexity_equals_the_plain_sub_model(trained_run, tmp_path):
    """`eval --text` at exit 2 equals exp(mean CE) of the extracted 2-layer model over the 200-token blocks."""
    path = tmp_path / "t.txt"
    path.write_text(TEXT)
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["eval", str(trained_run), "--data", "demo", "--rows", "0:4", "--text", str(path),
                                      "--max-length", "200", "--output", str(out)])
    assert result.exit_code == 0, result.output
    rows = {r["spec"]: r for r in json.loads((out / "eval.json").read_text())}
    nested = manyinone.open_checkpoint(trained_run)
    sub = nested.sub_model(SubnetSpec(depth=2))
    nll, count = 0.0, 0
    for block in text_examples(path, nested.tokenizer, 200):
        ids = torch.tensor([block.input_ids])
        with torch.no_grad():
            logits = sub(input_ids=ids).logits[0, :-1]  # [seq-1, vocab]
        nll += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    assert rows["depth=2"]["text_ppl"] == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_qa_scores_match_greedy_answers_of_each_exit(trained_run, tmp_path):
    """Score three questions whose gold answer is what the exit itself says: EM must be 1.0 there."""
    nested = manyinone.open_checkpoint(trained_run)
    space = nested.space
    questions = [{"question": q, "golden_answers": ["__never__"]} for q in ("a?", "bb?", "ccc?")]
    scores = qa_scores(nested, space, questions, batch_size=2, max_new_tokens=4)
    assert set(scores) == {"depth=2", "depth=4"}
    assert all(s == {"qa_em": 0.0, "qa_contains": 0.0} for s in scores.values())
    # Now make the gold answers the exit's own greedy answers, found through plain HF generate.
    from manyinone.train.data import prompt_and_response
    from manyinone.eval.tasks import QA_INSTRUCTION, first_line

    sub = nested.sub_model(SubnetSpec(depth=2))
    answered = []
    for q in questions:
        prompt = prompt_and_response({"instruction": QA_INSTRUCTION.format(question=q["question"]), "input": "",
                                      "output": ""}, nested.tokenizer, "alpaca")[0]
        enc = nested.tokenizer(prompt, return_tensors="pt")
        out = sub.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=nested.tokenizer.pad_token_id)
        text = first_line(nested.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
        answered.append({"question": q["question"], "golden_answers": [text or "__empty__"]})
    expected = sum(a["golden_answers"][0] != "__empty__" for a in answered) / 3
    assert qa_scores(nested, space, answered, batch_size=2, max_new_tokens=4)["depth=2"]["qa_em"] == pytest.approx(expected)
