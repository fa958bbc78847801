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


def _hf_greedy_answers(nested, spec, prompts, batch_size, max_new_tokens, stop_ids):
    """The path QA took before the runtime: the exit's extracted HF model, left-padded batches, HF greedy."""
    tokenizer, model = nested.tokenizer, nested.sub_model(spec).eval()
    pad = tokenizer.pad_token_id
    answers = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        longest = max(map(len, chunk))
        ids = torch.tensor([[pad] * (longest - len(p)) + p for p in chunk])  # [batch, longest]
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in chunk])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad, eos_token_id=sorted(stop_ids))
        answers += tokenizer.batch_decode(out[:, longest:], skip_special_tokens=True)
    return answers


@pytest.fixture(scope="module")
def width_heads_run(tiny_llama, tmp_path_factory):
    from manyinone.train.config import TrainConfig
    from manyinone.train.loop import train

    cfg = TrainConfig(model=str(tiny_llama), axes=["depth", "width", "heads"], exits=[2, 4], widths=[32, 64], heads=[2],
                      data="demo", max_steps=1, batch_size=4, sampler="sandwich", calibration_batches=1,
                      output=str(tmp_path_factory.mktemp("runs") / "width"))
    return train(cfg, show_progress=False)


@pytest.fixture(scope="module")
def translator_run(tiny_llama, tmp_path_factory):
    from manyinone.train.config import TrainConfig
    from manyinone.train.loop import train

    cfg = TrainConfig(model=str(tiny_llama), exits=[2, 4], data="demo", max_steps=2, batch_size=4, lr=1e-3,
                      exit_heads="translator", output=str(tmp_path_factory.mktemp("runs") / "translator"))
    return train(cfg, show_progress=False)


@pytest.mark.parametrize("run", ["trained_run", "width_heads_run", "translator_run"])
def test_qa_answers_through_the_runtime_equal_hf_greedy_at_every_exit(run, request):
    """QA's answers (the decode runtime, batched, left-padded) equal the old path's (HF greedy on each exit's
    extracted model) at every spec, in float32: depth exits, (width, heads) specs and per-exit translators."""
    from manyinone.eval.tasks import qa_answers, qa_prompt, qa_runtime
    from manyinone.train.data import encode_prompt

    nested = manyinone.open_checkpoint(request.getfixturevalue(run))
    questions = [{"question": q, "golden_answers": ["x"]} for q in ("a?", "what is bb?", "c", "dddd dd d?", "e e?")]
    prompts = [encode_prompt(qa_prompt(q), nested.tokenizer, "alpaca") for q in questions]
    assert len(set(map(len, prompts))) > 1  # rows of different lengths: left padding is exercised
    stop = qa_runtime(nested, prompts, 2, 6).default_stop_ids()
    answers = qa_answers(nested, nested.space, questions, batch_size=2, max_new_tokens=6)
    assert set(answers) == {s.label for s in nested.space.specs()}
    for spec in nested.space.specs():
        assert answers[spec.label] == _hf_greedy_answers(nested, spec, prompts, 2, 6, stop), spec.label
    assert any(a.strip() for labelled in answers.values() for a in labelled)  # not all empty: a real comparison


def test_qa_prompts_are_the_training_prompt_encoding(trained_run):
    """QA encodes its prompts with the one prompt encoder: a chat template brings its own BOS (no second one)."""
    from manyinone.eval.tasks import qa_prompt
    from manyinone.train.data import encode_prompt, prompt_and_response

    nested = manyinone.open_checkpoint(trained_run)
    record = qa_prompt({"question": "a?"})
    text = prompt_and_response(record, nested.tokenizer, "alpaca")[0]
    assert encode_prompt(record, nested.tokenizer, "alpaca") == nested.tokenizer(text)["input_ids"]
