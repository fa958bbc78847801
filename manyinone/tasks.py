"""Quality beyond held-out loss, per exit: perplexity on raw text and closed-book QA exact match.

- Raw text (e.g. WikiText-2 test): the text is tokenized once and cut into non-overlapping blocks;
  every token is scored, so `evaluate_exits` on these blocks gives each exit's perplexity.
- QA (e.g. TriviaQA, records `{"question": ..., "golden_answers": [...]}`): each exit's sub-model
  answers greedily from the training template; exact match after SQuAD-style normalisation against
  any alias. `contains` (an alias appears anywhere in the answer) is reported beside it, labelled.
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path
from typing import Any

import torch

from manyinone.data import Example, prompt_and_response
from manyinone.dims import NestedSpace
from manyinone.errors import ManyinoneError
from manyinone.progress import TrainProgress

QA_INSTRUCTION = "Answer the following trivia question with just the answer, in a few words.\n\n{question}"


def text_examples(path: str | Path, tokenizer, block: int, max_blocks: int | None = None) -> list[Example]:
    """Non-overlapping `block`-token windows of a UTF-8 text file, every token supervised."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except IsADirectoryError:
        raise ManyinoneError(f"text file {str(path)!r} is a folder; expected UTF-8 text") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManyinoneError(f"text file {str(path)!r} unreadable ({type(exc).__name__}); expected UTF-8 text") from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    blocks = [ids[i:i + block] for i in range(0, len(ids) - block + 1, block)][:max_blocks]
    if not blocks:
        raise ManyinoneError(f"text file {str(path)!r} has {len(ids)} tokens, fewer than one block of {block}")
    return [Example(input_ids=b, labels=list(b)) for b in blocks]


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, aliases: list[str]) -> bool:
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(a) for a in aliases)


def alias_contained(prediction: str, aliases: list[str]) -> bool:
    pred = f" {normalize_answer(prediction)} "
    return any(f" {normalize_answer(a)} " in pred for a in aliases if normalize_answer(a))


def read_qa(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """QA records from a .jsonl file: `question` (str) and `golden_answers` (non-empty list of str)."""
    records = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except IsADirectoryError:
        raise ManyinoneError(f"QA file {str(path)!r} is a folder; expected a .jsonl file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManyinoneError(f"QA file {str(path)!r} unreadable ({type(exc).__name__})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):  # also an int of >4300 digits, nesting too deep
            raise ManyinoneError(f"QA file {str(path)!r} line {number}: not valid JSON") from None
        ok = (isinstance(row, dict) and isinstance(row.get("question"), str)
              and isinstance(row.get("golden_answers"), list) and row["golden_answers"]
              and all(isinstance(a, str) for a in row["golden_answers"]))
        if not ok:
            raise ManyinoneError(f"QA file {str(path)!r} line {number}: needs 'question' (string) and "
                                 "'golden_answers' (non-empty list of strings)")
        records.append(row)
    return records[:limit]


def first_line(text: str) -> str:
    return text.strip().split("\n")[0].strip()


@torch.no_grad()
def qa_scores(nested, space: NestedSpace, records: list[dict[str, Any]], template: str = "alpaca",
              batch_size: int = 32, max_new_tokens: int = 24, device: str | torch.device = "cpu",
              show_progress: bool = False) -> dict[str, dict[str, float]]:
    """spec label -> {"qa_em", "qa_contains"}: greedy answers of each exit's sub-model."""
    tokenizer = nested.tokenizer
    prompts = [prompt_and_response({"instruction": QA_INSTRUCTION.format(question=r["question"]), "input": "",
                                    "output": ""}, tokenizer, template)[0] for r in records]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation appends on the right
    device = torch.device(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    scores: dict[str, dict[str, float]] = {}
    batches = range(0, len(prompts), batch_size)
    try:
        with TrainProgress(len(batches) * len(space.specs()), [], enabled=show_progress, description="qa") as progress:
            for s_index, spec in enumerate(space.specs()):
                model = nested.sub_model(spec).eval()
                em = contains = 0
                for b_index, start in enumerate(batches):
                    enc = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                                    add_special_tokens=template != "chat").to(device)
                    with autocast:
                        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                             pad_token_id=tokenizer.pad_token_id)
                    answers = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                    for answer, record in zip(answers, records[start:start + batch_size]):
                        em += exact_match(first_line(answer), record["golden_answers"])
                        contains += alias_contained(first_line(answer), record["golden_answers"])
                    progress.update(s_index * len(batches) + b_index + 1, {})
                scores[spec.label] = {"qa_em": em / len(records), "qa_contains": contains / len(records)}
    finally:
        tokenizer.padding_side = side
    return scores
