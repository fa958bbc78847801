"""Records -> token ids with everything but the supervised text masked out of the loss, and batches.

Records come from `manyinone.train.records` (alpaca, messages or text rows from json/jsonl/parquet/
csv/hub sources). Templates: `alpaca` (the Alpaca prompt), `chat` (the tokenizer's chat template),
`auto` (chat when the tokenizer has a chat template, else alpaca). `messages` rows always go through
the chat template with the loss on assistant turns only; `text` rows are supervised throughout.
With packing, several examples share a row: positions restart at each example and the model's
attention stays inside it (block-diagonal, built by transformers from where positions restart).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from manyinone.core.errors import ManyinoneError
from manyinone.train.records import (  # noqa: F401  (re-exported: the data API in one place)
    DEMO, FORMATS, demo_records, is_unicode, load_records, parse_rows, read_json_rows, records_format,
    validate_records,
)

IGNORE = -100  # label value skipped by the loss (prompt and padding positions)
TEMPLATES = ("alpaca", "chat")

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{ctx}. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


def resolve_template(template: str, tokenizer) -> str:
    """`auto` -> chat when the tokenizer has a chat template (an Instruct model), else alpaca."""
    if template == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
    if template not in TEMPLATES:
        raise ManyinoneError(f"prompt template {template!r} unknown; allowed {list(TEMPLATES)} or 'auto'")
    return template


def _check_unicode(record: dict[str, Any]) -> None:
    texts = [v for v in record.values() if isinstance(v, str)]
    texts += [m.get("content") for m in record.get("messages") or [] if isinstance(m, dict)]
    bad = next((v for v in texts if isinstance(v, str) and not is_unicode(v)), None)
    if bad is not None:
        raise ManyinoneError(f"text {bad!r:.40} is not valid Unicode (a lone surrogate, e.g. from bytes that are "
                             "not UTF-8); pass UTF-8 text")


def _chat(tokenizer, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ManyinoneError("template 'chat' (and messages rows) need a tokenizer with a chat_template; this one "
                             "has none: use alpaca rows with template alpaca")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _last_assistant(messages: list[dict[str, str]]) -> int:
    return max(i for i, m in enumerate(messages) if m["role"] == "assistant")


def prompt_and_response(record: dict[str, Any], tokenizer, template: str) -> tuple[str, str]:
    """The prompt text (masked out of the loss) and the response text for one record: for a messages
    row, the conversation before its last assistant turn and that turn as the template renders it."""
    _check_unicode(record)
    template = resolve_template(template, tokenizer)
    if "text" in record:
        raise ManyinoneError("text rows carry no prompt (they are supervised throughout); prompts for generation "
                             "need alpaca or messages rows")
    if "messages" in record:
        if not getattr(tokenizer, "chat_template", None):
            _chat(tokenizer, [], False)  # raises: messages rows need the chat template
        if template != "chat":
            raise ManyinoneError("messages rows are formatted by the tokenizer's chat template; set template=chat "
                                 "(or auto)")
        last = _last_assistant(record["messages"])
        prompt = _chat(tokenizer, record["messages"][:last], True)
        through = _chat(tokenizer, record["messages"][:last + 1], False)
        if not through.startswith(prompt):
            raise _inconsistent(last)
        return prompt, through[len(prompt):]
    if template == "chat":
        content = record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")
        prompt = _chat(tokenizer, [{"role": "user", "content": content}], True)
    else:
        ctx = ", paired with an input that provides further context" if record["input"] else ""
        block = f"### Input:\n{record['input']}\n\n" if record["input"] else ""
        prompt = ALPACA_PROMPT.format(ctx=ctx, instruction=record["instruction"], input_block=block)
    return prompt, record["output"] + (tokenizer.eos_token or "")


def _inconsistent(turn: int) -> ManyinoneError:
    return ManyinoneError(f"the tokenizer's chat template renders message {turn} differently once the conversation "
                          "goes on (its generation prompt is not a prefix of the conversation), so assistant turns "
                          "cannot be masked exactly; use a template whose turns only append")


def segments(record: dict[str, Any], tokenizer, template: str) -> list[tuple[str, bool]]:
    """A record's text as (piece, supervised) pieces in order, the one place that says what the loss sees:
    alpaca/chat: prompt, response; messages: everything but assistant turns unsupervised; text: all of it."""
    _check_unicode(record)
    template = resolve_template(template, tokenizer)
    if "text" in record:
        return [(record["text"] + (tokenizer.eos_token or ""), True)]
    if "messages" not in record:
        prompt, response = prompt_and_response(record, tokenizer, template)
        return [(prompt, False), (response, True)]
    if template != "chat":
        prompt_and_response(record, tokenizer, template)  # raises: messages need the chat template
    messages, pieces, done = record["messages"], [], ""
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _chat(tokenizer, messages[:k], True) if k else ""
        through = _chat(tokenizer, messages[:k + 1], False)
        if not prompt.startswith(done) or not through.startswith(prompt):
            raise _inconsistent(k)
        pieces += [(prompt[len(done):], False), (through[len(prompt):], True)]
        done = through
    full = _chat(tokenizer, messages, False)
    if not full.startswith(done):
        raise _inconsistent(len(messages) - 1)
    pieces.append((full[len(done):], False))  # turns after the last assistant one (usually nothing)
    return [(text, supervised) for text, supervised in pieces if text]


def adds_special_tokens(template: str) -> bool:
    """Whether the tokenizer adds its special tokens (BOS) to a prompt text of `template`.

    A chat-template text already carries them, so adding them again would give the model a second
    BOS that training never showed it; any other text (alpaca, a raw completion prompt) gets them.
    """
    return template != "chat"


def encode_text(tokenizer, text: str, template: str) -> list[int]:
    """Token ids of an already-templated prompt text, as training tokenized it (see `encode_prompt`).
    `template`: "chat" for chat-template text (its BOS is in it), anything else for plain text."""
    return tokenizer(text, add_special_tokens=adds_special_tokens(resolve_template(template, tokenizer)
                                                                  if template == "auto" else template))["input_ids"]


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE on unsupervised positions
    positions: list[int] | None = None  # a packed row: each example's positions, restarting at 0


def encode_prompt(record: dict[str, Any], tokenizer, template: str) -> list[int]:
    """The prompt's token ids exactly as training sees them (a chat template brings its own BOS): the one
    prompt encoder for training, eval, the runtime's tuning and the server."""
    prompt, _ = prompt_and_response(record, tokenizer, template)
    return encode_text(tokenizer, prompt, resolve_template(template, tokenizer))


def encode_record(record: dict[str, Any], tokenizer, template: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one whole record, untruncated; labels are IGNORE outside supervised pieces."""
    template = resolve_template(template, tokenizer)
    ids: list[int] = []
    labels: list[int] = []
    text_row = "text" in record
    for n, (piece, supervised) in enumerate(segments(record, tokenizer, template)):
        special = n == 0 and (text_row or adds_special_tokens(template))  # BOS once, unless the template has it
        tokens = tokenizer(piece, add_special_tokens=special)["input_ids"]
        ids += tokens
        labels += tokens if supervised else [IGNORE] * len(tokens)
    return ids, labels


def tokenize_records(records: list[dict[str, Any]], tokenizer, max_length: int, template: str = "alpaca") -> list[Example]:
    """Token ids with exact loss masks. Prompted rows are truncated to max_length; a text row longer
    than that becomes consecutive max_length windows (continued pretraining loses no text)."""
    examples = []
    for record in records:
        ids, labels = encode_record(record, tokenizer, template)
        starts = range(0, len(ids), max_length) if "text" in record else [0]
        for s in starts:
            window_ids, window_labels = ids[s:s + max_length], labels[s:s + max_length]
            if any(label != IGNORE for label in window_labels[1:]):  # keep only rows with a supervised token left
                examples.append(Example(window_ids, window_labels))
    if not examples:
        raise ManyinoneError(f"no example keeps a response token within max_length={max_length}; raise it")
    return examples


def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Several examples per row of at most max_length tokens (first-fit by decreasing length, which is
    deterministic), each keeping its own positions 0..n-1 so attention and RoPE stay inside it."""
    rows: list[list[Example]] = []
    room: list[int] = []
    for e in sorted(examples, key=lambda e: -len(e.input_ids)):  # sorted() is stable: ties keep source order
        n = len(e.input_ids)
        fit = next((r for r, free in enumerate(room) if free >= n), None)
        if fit is None:
            rows.append([e])
            room.append(max_length - n)
        else:
            rows[fit].append(e)
            room[fit] -= n
    return [Example([t for e in row for t in e.input_ids], [t for e in row for t in e.labels],
                    [p for e in row for p in range(len(e.input_ids))]) for row in rows]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example, each tensor [batch, seq]: input_ids, labels, and
    attention_mask (plain rows) or position_ids (packed rows: the padding is one more segment of its
    own, and transformers builds the block-diagonal causal mask from where positions restart; row_tokens
    [batch] counts each row's real tokens)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    packed = any(e.positions is not None for e in examples)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    positions = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n], labels[row, :n], mask[row, :n] = torch.tensor(e.input_ids), torch.tensor(e.labels), 1
        positions[row, :n] = torch.tensor(e.positions if e.positions is not None else range(n))
        positions[row, n:] = torch.arange(width - n)
    if packed:
        return {"input_ids": ids, "position_ids": positions, "labels": labels, "row_tokens": mask.sum(1)}
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-padding) tokens in a collated batch."""
    return int(batch["attention_mask"].sum() if "attention_mask" in batch else batch["row_tokens"].sum())


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
