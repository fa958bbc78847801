"""Quality beyond held-out loss, per exit: perplexity on raw text and closed-book QA exact match.

- Raw text (e.g. WikiText-2 test): the text is tokenized once and cut into non-overlapping blocks;
  every token is scored, so `evaluate_exits` on these blocks gives each exit's perplexity.
- QA (e.g. TriviaQA, records `{"question": ..., "golden_answers": [...]}`): each exit answers
  greedily from the training template (prompts from `train.data.encode_prompt`, answers from the
  decode runtime: the one generation path); exact match after SQuAD-style normalisation against
  any alias. `contains` (an alias appears anywhere in the answer) is reported beside it, labelled.
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path
from typing import Any

import torch

from manyinone.train.data import Example, encode_prompt
from manyinone.core.space import NestedSpace
from manyinone.core.errors import ManyinoneError
from manyinone.train.progress import TrainProgress

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


def qa_prompt(record: dict[str, Any]) -> dict[str, str]:
    """The alpaca-style row whose prompt asks the record's question."""
    return {"instruction": QA_INSTRUCTION.format(question=record["question"]), "input": "", "output": ""}


def qa_runtime(nested, prompts: list[list[int]], batch_size: int, max_new_tokens: int):
    """A decode runtime over `nested` sized for these prompts: a context of the longest prompt plus the
    answer, and KV cache for a whole batch (an evaluation job, not a server, so no smaller cap)."""
    from manyinone.runtime import Runtime

    max_len = max(map(len, prompts)) + max_new_tokens
    return Runtime.from_nested(nested, max_len=max_len).fit_batch(min(batch_size, len(prompts)))


def qa_answers(nested, space: NestedSpace, records: list[dict[str, Any]], template: str = "alpaca",
               batch_size: int = 32, max_new_tokens: int = 24, show_progress: bool = False) -> dict[str, list[str]]:
    """spec label -> each record's greedy answer at that exit, through the decode runtime (on the
    checkpoint's device and dtype), batched `batch_size` prompts at a time."""
    from manyinone.runtime import Sampling

    if not records:
        raise ManyinoneError("no QA records to answer")
    if nested.exit_heads is not None and any(set(s) != {"depth"} for s in nested.exit_heads.specs):
        raise ManyinoneError("this checkpoint has exit heads on (width, heads) specs, which the decode runtime "
                             "does not serve yet; evaluate QA on a depth-only checkpoint")
    prompts = [encode_prompt(qa_prompt(r), nested.tokenizer, template) for r in records]
    runtime = qa_runtime(nested, prompts, batch_size, max_new_tokens)
    batches = range(0, len(prompts), batch_size)
    answers: dict[str, list[str]] = {}
    with TrainProgress(len(batches) * len(space.specs()), [], enabled=show_progress, description="qa") as progress:
        for s_index, spec in enumerate(space.specs()):
            answers[spec.label] = []
            for b_index, start in enumerate(batches):
                out = runtime.generate(prompts[start:start + batch_size], max_new_tokens=max_new_tokens,
                                       sampling=Sampling(), spec=spec)  # Sampling(): greedy
                answers[spec.label] += [runtime.decode(tokens) for tokens in out.tokens]
                progress.update(s_index * len(batches) + b_index + 1, {})
    return answers


def qa_scores(nested, space: NestedSpace, records: list[dict[str, Any]], template: str = "alpaca",
              batch_size: int = 32, max_new_tokens: int = 24, device: str | torch.device | None = None,
              show_progress: bool = False) -> dict[str, dict[str, float]]:
    """spec label -> {"qa_em", "qa_contains"}: greedy answers of each exit (`qa_answers`), first line
    scored. `device` is accepted for older callers; answers run where the checkpoint was opened."""
    scores: dict[str, dict[str, float]] = {}
    for label, answers in qa_answers(nested, space, records, template, batch_size, max_new_tokens,
                                     show_progress).items():
        em = sum(exact_match(first_line(a), r["golden_answers"]) for a, r in zip(answers, records))
        contains = sum(alias_contained(first_line(a), r["golden_answers"]) for a, r in zip(answers, records))
        scores[label] = {"qa_em": em / len(records), "qa_contains": contains / len(records)}
    return scores
