"""Training data from the teacher itself: sampled responses to the training prompts, as JSONL.

`manyinone distill-data` samples `samples` responses per prompt with manyinone's own runtime
(static KV cache, CUDA graphs, a whole batch per step) and writes Alpaca records
(`instruction`, `input`, `output`) that `manyinone train --set mix_data=...` mixes with the
labelled set. With `--text`, the prompts are raw-text prefixes instead and the rows are `text`
records (prefix + continuation). Each record also says which prompt and sample it is (`prompt_index`, `sample`,
`prompt_sha256`), so a resumed run can check it was sampled for the same prompts.

Durability: lines are appended to `<output>.partial` one whole batch at a time, flushed and
fsync'ed; `<output>.partial.json` holds the settings. A killed run is resumed by running the same
command again: a line the kill cut short is dropped, finished prompts/samples are skipped, missing
ones are sampled, so nothing is duplicated or lost. When every sample is written, the file is
renamed to `<output>` in one step: a reader never sees a half-written dataset under that name.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from manyinone.core.errors import ManyinoneError
from manyinone.io.durable import append_durably, fsync_dir, publish_file, truncate_durably, write_failure, write_text_durably


@dataclass(frozen=True)
class SampleSettings:
    """What makes two runs the same dataset (a resume must match these exactly)."""

    teacher: str
    data: str
    rows: str | None
    template: str
    samples: int
    temperature: float
    top_p: float
    max_new_tokens: int
    batch_size: int
    seed: int
    prefix_tokens: int | None = None  # raw-text prompts (`--text`): tokens per prefix
    prefixes: int | None = None  # and how many


def prompt_sha(record: dict[str, str]) -> str:
    key = ["text", record["text"]] if "text" in record else [record["instruction"], record["input"]]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def text_prefixes(text: str, tokenizer, count: int, prefix_tokens: int, seed: int) -> list[dict[str, str]]:
    """`count` raw-text prompts: windows of `prefix_tokens` tokens at offsets drawn from (seed), as
    `text` records. The teacher continues each one, so the generated rows carry general text (the
    labelled set's instructions alone make a model forget it: WikiText perplexity rises)."""
    import torch

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= prefix_tokens:
        raise ManyinoneError(f"the text has {len(ids)} tokens, not more than --prefix-tokens {prefix_tokens}; "
                             "give a longer text or fewer prefix tokens")
    starts = torch.randint(0, len(ids) - prefix_tokens, (count,), generator=torch.Generator().manual_seed(seed))
    return [{"text": tokenizer.decode(ids[s:s + prefix_tokens])} for s in starts.tolist()]


def work_units(n_prompts: int, samples: int, batch_size: int) -> list[list[tuple[int, int]]]:
    """(prompt, sample) pairs in fixed batches: batch b always holds the same pairs and uses seed
    (seed, b), so a resumed run samples a missing pair exactly as the first run would have."""
    pairs = [(p, s) for s in range(samples) for p in range(n_prompts)]
    return [pairs[i:i + batch_size] for i in range(0, len(pairs), batch_size)]


def batch_seed(seed: int, batch: int) -> int:
    return (seed * 1_000_003 + batch) % 2**63


def read_partial(path: Path, records: list[dict[str, str]]) -> set[tuple[int, int]]:
    """The (prompt, sample) pairs already in `path`; cuts off a line a kill left unfinished and
    refuses records that were sampled for other prompts than these."""
    if not path.is_file():
        return set()
    raw = path.read_bytes()
    complete = raw[:raw.rfind(b"\n") + 1]  # everything up to the last whole line
    if len(complete) != len(raw):
        truncate_durably(path, len(complete))
    done = set()
    for n, line in enumerate(complete.decode("utf-8").splitlines()):
        try:
            row = json.loads(line)
            key = (int(row["prompt_index"]), int(row["sample"]))
            sha = row["prompt_sha256"]
        except (ValueError, KeyError, TypeError):
            raise ManyinoneError(f"generated dataset {str(path)!r}: line {n} is not a record this command wrote; "
                                 "delete the file or choose another --output") from None
        if not 0 <= key[0] < len(records) or sha != prompt_sha(records[key[0]]):
            raise ManyinoneError(f"generated dataset {str(path)!r}: line {n} was sampled for prompt {key[0]} of other "
                                 "data than these prompts; use the same --data/--rows or another --output")
        done.add(key)
    return done


def distill_dataset(output: str | os.PathLike, settings: SampleSettings, records: list[dict[str, str]],
                    sample: Callable[[list[dict[str, str]], int], list[str]],
                    progress: Callable[[int, int], None] | None = None) -> tuple[Path, int]:
    """Write `settings.samples` responses per record to `output` (JSONL), resumably.

    sample(records, seed) returns one response text per record. Returns (path, new records written).
    Empty responses are not written (training refuses records without output).
    """
    out = Path(output)
    if out.exists():
        raise ManyinoneError(f"generated dataset {str(out)!r} already exists; choose another --output "
                             "(or delete it to sample again)")
    partial, meta = out.with_name(out.name + ".partial"), out.with_name(out.name + ".partial.json")
    wanted = asdict(settings)
    if meta.is_file():
        try:
            before = json.loads(meta.read_text())
        except ValueError:
            before = None
        if before != wanted:
            changed = sorted(k for k in wanted if not isinstance(before, dict) or before.get(k) != wanted[k])
            raise ManyinoneError(f"{str(partial)!r} holds an unfinished run with other settings {changed}; "
                                 "run it with the same settings, or delete it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_durably(meta, json.dumps(wanted, indent=1) + "\n")
    except OSError as exc:
        raise write_failure(out, exc) from None
    done = read_partial(partial, records)
    batches = work_units(len(records), settings.samples, settings.batch_size)
    total = len(records) * settings.samples
    written = 0
    with open(partial, "a", encoding="utf-8") as f:
        for b, units in enumerate(batches):
            todo = [u for u in units if u not in done]
            if not todo:
                continue
            # The whole batch is sampled (same rows, same seed as a first run); only missing pairs are kept.
            texts = sample([records[p] for p, _ in units], batch_seed(settings.seed, b))
            lines = []
            for (p, s), text in zip(units, texts):
                if (p, s) in done or not text.strip():  # an empty response (EOS at once) is no training record
                    continue
                rec = records[p]
                body = {"text": rec["text"] + text} if "text" in rec else \
                    {"instruction": rec["instruction"], "input": rec["input"], "output": text}
                lines.append(json.dumps({**body, "prompt_index": p, "sample": s, "prompt_sha256": prompt_sha(rec)},
                                        ensure_ascii=False) + "\n")
            try:
                append_durably(f, "".join(lines))
            except OSError as exc:
                raise write_failure(partial, exc) from None
            done.update(todo)
            written += len(lines)
            if progress is not None:
                progress(len(done), total)
    publish_file(partial, out)  # complete: one rename publishes it
    meta.unlink(missing_ok=True)
    fsync_dir(out.parent)
    return out, written


def runtime_sampler(model, tokenizer, template: str, max_new_tokens: int, temperature: float, top_p: float,
                    counter: Callable[[int], None] | None = None, records: list[dict[str, str]] | None = None,
                    batch_size: int | None = None) -> Callable[[list[dict[str, str]], int], list[str]]:
    """`sample` for `distill_dataset` through manyinone's runtime: one batched call per batch.

    counter(n) is told how many tokens each call generated (for the throughput display). Given all
    `records` and the `batch_size`, the KV cache is sized to this job (longest prompt + new tokens,
    that many rows) instead of the runtime's default context: decode attention reads the whole
    cache buffer, so a buffer no longer than needed is what makes large batches fast.
    """
    from manyinone.train.data import encode_prompt
    from manyinone.runtime.generate import Runtime
    from manyinone.runtime.sampling import Sampling

    def prompt_ids(record: dict[str, str]) -> list[int]:
        if "text" in record:  # a raw-text prefix starts as training starts a text row (BOS, no template)
            return tokenizer(record["text"])["input_ids"]
        return encode_prompt(record, tokenizer, template)

    prompts_of = lambda recs: [prompt_ids(r) for r in recs]  # noqa: E731
    if records and batch_size:
        longest = max(len(p) for p in prompts_of(records))
        runtime = Runtime(model, tokenizer, max_len=longest + max_new_tokens).fit_batch(batch_size)
    else:
        runtime = Runtime(model, tokenizer)

    def sample(recs: list[dict[str, str]], seed: int) -> list[str]:
        out = runtime.generate(prompts_of(recs), None, max_new_tokens, Sampling(temperature, top_p, seed))
        if counter is not None:
            counter(sum(len(t) for t in out.tokens))
        return [tokenizer.decode(t, skip_special_tokens=True) for t in out.tokens]

    return sample
