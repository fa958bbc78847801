"""Frozen-teacher distillation, mixed data, generated datasets and agreement on generations (issue 19)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import manyinone.train.teacher as teacher_module
from manyinone.cli import app
from manyinone.train.config import TrainConfig
from manyinone.train.data import load_records, mixed_count, mixed_epoch_order
from manyinone.core.space import SubnetSpec
from manyinone.train.distill_data import SampleSettings, distill_dataset
from manyinone.core.errors import ManyinoneError
from manyinone.eval.evaluate import evaluate_exits, generation_examples
from manyinone.train.lean_loss import LinearHead
from manyinone.io.loading import load_pretrained
from manyinone.train.losses import TeacherTarget, nested_loss
from manyinone.core.registry import adapter_for
from manyinone.train.loop import train

FAST = dict(data="demo", batch_size=2, max_length=200, lr=1e-3)
S1, S2, S3 = (SubnetSpec({"depth": d}) for d in (1, 2, 3))


def config(model: Path, output: Path, **fields) -> TrainConfig:
    return TrainConfig(**{"model": str(model), "exits": [2, 4], **FAST, "output": str(output), **fields})


# --- the loss -----------------------------------------------------------------------------------
def test_teacher_kl_equals_a_hand_computed_reference():
    """Two tokens, three words: KL written out term by term, both directions, at T = 2."""
    student = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    teacher_logits = torch.tensor([[0.0, 1.0, 0.0], [2.0, -1.0, 0.0]])
    eye = torch.eye(3)  # teacher features = its logits, head = identity
    t = 2.0
    for reverse in (False, True):
        expected = 0.0
        for row in range(2):
            q = [math.exp(v / t) for v in student[row].tolist()]
            p = [math.exp(v / t) for v in teacher_logits[row].tolist()]
            q = [v / sum(q) for v in q]
            p = [v / sum(p) for v in p]
            a, b = (q, p) if reverse else (p, q)
            expected += sum(x * math.log(x / y) for x, y in zip(a, b))
        expected = expected / 2 * t * t
        frozen = TeacherTarget(teacher_logits, eye, {S1: 1.0}, temperature=t, reverse=reverse)
        out = nested_loss({S1: student}, lambda h: h, torch.tensor([0, 2]), {S1: 0.0}, frozen=frozen)
        assert out.teacher_kl[S1].item() == pytest.approx(expected, rel=1e-5)
        assert out.total.item() == pytest.approx(expected, rel=1e-5)  # CE weight 0: the KL alone


@pytest.mark.parametrize("reverse", [False, True])
def test_lean_teacher_loss_equals_plain_gradients_included(reverse):
    torch.manual_seed(0)
    tokens, hidden, vocab, teacher_hidden = 13, 8, 11, 6
    norm = torch.nn.LayerNorm(hidden).double()
    weight = torch.randn(vocab, hidden, dtype=torch.float64, requires_grad=True)
    feats = {s: torch.randn(tokens, hidden, dtype=torch.float64, requires_grad=True) for s in (S1, S2, S3)}
    targets = torch.randint(0, vocab, (tokens,))
    frozen = TeacherTarget(torch.randn(tokens, teacher_hidden, dtype=torch.float64),
                           torch.randn(vocab, teacher_hidden, dtype=torch.float64),
                           {S1: 0.7, S2: 0.0, S3: 1.1}, temperature=1.7, reverse=reverse)
    results = []
    for head in (LinearHead(norm, weight), lambda h: torch.nn.functional.linear(norm(h), weight)):
        out = nested_loss(feats, head, targets, {S1: 1.0, S2: 0.5, S3: 2.0}, teacher=S3, distill_weight=0.4,
                          temperature=2.0, chunk_rows=4, frozen=frozen)
        results.append((out, torch.autograd.grad(out.total, [weight, *feats.values()])))
    (lean, lean_grads), (plain, plain_grads) = results
    assert lean.total.item() == pytest.approx(plain.total.item(), rel=1e-6)
    assert set(lean.teacher_kl) == set(plain.teacher_kl) == {S1, S3}  # S2's weight is 0: no term, nothing logged
    for s in (S1, S3):
        assert lean.teacher_kl[s].item() == pytest.approx(plain.teacher_kl[s].item(), rel=1e-5, abs=1e-7)
    for a, b in zip(lean_grads, plain_grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    assert lean_grads[2].abs().sum() > 0  # S2 has no teacher term but still its CE


# --- training with a teacher ----------------------------------------------------------------------
def test_a_frozen_teacher_is_bit_identical_after_training(tiny_llama, tmp_path, monkeypatch):
    loaded = []
    original = teacher_module.Teacher.load.__func__

    def recording_load(cls, *args, **kwargs):
        loaded.append(original(cls, *args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(teacher_module.Teacher, "load", classmethod(recording_load))
    run = train(config(tiny_llama, tmp_path / "run", teacher=str(tiny_llama), teacher_dtype="float32", max_steps=3),
                show_progress=False)
    fresh, _ = load_pretrained(str(tiny_llama))
    after = loaded[0].model.state_dict()
    assert [k for k, v in fresh.state_dict().items() if not torch.equal(v, after[k])] == []
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # The student starts as the teacher: at step 1 every exit's KL to it is finite, the full depth's ~0.
    assert rows[0]["teacher_kl/depth=4"] == pytest.approx(0.0, abs=1e-5)
    assert rows[0]["teacher_kl/depth=2"] > 1e-3
    assert all("teacher_s" in r for r in rows)


def test_teacher_errors_are_one_line(tiny_llama, tiny_qwen2, tmp_path):
    with pytest.raises(ManyinoneError, match="this run's own output folder"):
        train(config(tiny_llama, tmp_path / "run", teacher=str(tmp_path / "run"), max_steps=1), show_progress=False)
    different = tmp_path / "other-tok"
    model, tokenizer = load_pretrained(str(tiny_llama))
    tokenizer.add_tokens(["<extra_word>"])
    model.save_pretrained(different)
    tokenizer.save_pretrained(different)
    with pytest.raises(ManyinoneError, match="different tokenizer"):
        train(config(tiny_llama, tmp_path / "run2", teacher=str(different), max_steps=1), show_progress=False)
    result = CliRunner().invoke(app, ["train", "--model", str(tiny_llama), "--output", str(tmp_path / "r3"),
                                      "--set", "mix_data=demo", "--set", "mix_ratio=1.5", "--quiet"])
    assert result.exit_code == 2 and "mix_ratio" in result.output and "1.5" in result.output


# --- mixing --------------------------------------------------------------------------------------
def test_mixed_epochs_hold_every_label_once_and_fresh_pool_slices():
    labelled, pool = 10, 30
    per_epoch = mixed_count(labelled, pool, 0.5)
    assert per_epoch == 10
    seen = []
    for epoch in range(3):
        order = mixed_epoch_order(labelled, pool, per_epoch, 0.5, seed=3, epoch=epoch)
        assert sorted(i for i in order if i < labelled) == list(range(labelled))
        chosen = [i for i in order if i >= labelled]
        assert len(chosen) == per_epoch == len(set(chosen))
        seen += chosen
        assert order == mixed_epoch_order(labelled, pool, per_epoch, 0.5, seed=3, epoch=epoch)  # pure
    assert sorted(seen) == list(range(labelled, labelled + pool))  # 3 epochs x 10 cover the pool once
    assert mixed_count(10, 30, 0.0) == 0 and mixed_count(10, 30, 1.0) == 30 and mixed_count(10, 5, 0.9) == 5
    only_pool = mixed_epoch_order(labelled, pool, 30, 1.0, seed=0, epoch=0)
    assert sorted(only_pool) == list(range(labelled, labelled + pool))
    with pytest.raises(ManyinoneError, match="mix_ratio 1.5"):
        mixed_count(10, 30, 1.5)


def test_training_on_a_mix_sees_the_pool(tiny_llama, tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"instruction": f"Say {i}.", "input": "", "output": f"{i}"}) + "\n"
                            for i in range(8)))
    run = train(config(tiny_llama, tmp_path / "run", rows="0:8", mix_data=str(pool), mix_ratio=0.5, epochs=1,
                       max_length=512),
                show_progress=False)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == (8 + 8) // 2  # the epoch is labelled + pool, at batch 2


# --- generated datasets ----------------------------------------------------------------------------
def fake_sampler(calls: list):
    """Deterministic in (record, seed), like the runtime under a fixed seed."""
    def sample(records, seed):
        calls.append(seed)
        return [f"{r['instruction'][:6]}|{seed % 997}|{i}" for i, r in enumerate(records)]
    return sample


def settings(**kw) -> SampleSettings:
    base = dict(teacher="t", data="demo", rows="0:10", template="alpaca", samples=3, temperature=0.8, top_p=0.95,
                max_new_tokens=8, batch_size=4, seed=0)
    return SampleSettings(**{**base, **kw})


def test_generated_dataset_resumes_after_a_kill_without_duplicates_or_losses(tmp_path):
    records = load_records("demo", "0:10")
    clean, _ = distill_dataset(tmp_path / "clean.jsonl", settings(), records, fake_sampler([]))
    expected = clean.read_text().splitlines()
    assert len(expected) == 30

    target = tmp_path / "killed.jsonl"
    calls: list = []
    inner = fake_sampler(calls)

    def dies_after_three(recs, seed):
        if len(calls) == 3:
            raise KeyboardInterrupt  # the kill, between two batches
        return inner(recs, seed)

    with pytest.raises(KeyboardInterrupt):
        distill_dataset(target, settings(), records, dies_after_three)
    partial = tmp_path / "killed.jsonl.partial"
    assert not target.exists() and len(partial.read_text().splitlines()) == 12
    with open(partial, "a") as f:  # and a kill in the middle of writing a line
        f.write('{"instruction": "What is')
    _, written = distill_dataset(target, settings(), records, fake_sampler([]))
    assert written == 18
    got = target.read_text().splitlines()
    assert sorted(got) == sorted(expected)  # same records, none twice, none lost
    assert not partial.exists()


def test_generated_dataset_refuses_other_prompts_or_settings(tmp_path):
    records = load_records("demo", "0:10")
    target = tmp_path / "gen.jsonl"
    with pytest.raises(KeyboardInterrupt):
        distill_dataset(target, settings(), records, lambda recs, seed: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(ManyinoneError, match=r"other settings \['samples'\]"):
        distill_dataset(target, settings(samples=5), records, fake_sampler([]))
    partial = tmp_path / "gen.jsonl.partial"
    partial.write_text(json.dumps({"instruction": "x", "input": "", "output": "y", "prompt_index": 1, "sample": 0,
                                   "prompt_sha256": "0000"}) + "\n")
    with pytest.raises(ManyinoneError, match="sampled for prompt 1 of other data"):
        distill_dataset(target, settings(), records, fake_sampler([]))
    assert not target.exists()


def test_distill_data_command_writes_loadable_records(tiny_llama, tmp_path):
    out = tmp_path / "gen.jsonl"
    result = CliRunner().invoke(app, ["distill-data", "--teacher", str(tiny_llama), "--data", "demo", "--rows", "0:5",
                                      "--samples", "2", "--max-new-tokens", "6", "--batch-size", "4",
                                      "--dtype", "float32", "--device", "cpu", "-o", str(out)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["prompt_index"], r["sample"]) for r in rows} <= {(p, s) for p in range(5) for s in range(2)}
    assert len(rows) >= 8  # a random tiny model rarely samples EOS first
    assert load_records(str(out))  # training reads it as ordinary records
    again = CliRunner().invoke(app, ["distill-data", "--teacher", str(tiny_llama), "-o", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output


def test_distill_data_continues_raw_text_prefixes(tiny_llama, tmp_path):
    text = tmp_path / "story.txt"
    text.write_text("Once upon a time a small fox lived by the river and sang to the fish every morning. " * 4)
    out = tmp_path / "text.jsonl"
    args = ["distill-data", "--teacher", str(tiny_llama), "--text", str(text), "--prefixes", "6", "--prefix-tokens",
            "12", "--samples", "2", "--max-new-tokens", "5", "--batch-size", "4", "--dtype", "float32", "--device",
            "cpu", "-o", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) >= 10 and all(set(r) >= {"text", "prompt_index", "sample"} for r in rows)
    model, tokenizer = load_pretrained(str(tiny_llama))
    from manyinone.train.distill_data import text_prefixes

    prefixes = text_prefixes(text.read_text(), tokenizer, 6, 12, 0)
    for row in rows:  # each row is its prefix, then what the teacher wrote
        prefix = prefixes[row["prompt_index"]]["text"]
        assert row["text"].startswith(prefix) and len(row["text"]) > len(prefix)
    assert load_records(str(out))  # text rows: training reads them as continued-pretraining rows
    run = train(config(tiny_llama, tmp_path / "run", rows="0:8", mix_data=str(out), mix_ratio=0.5, epochs=1),
                show_progress=False)
    assert (run / "metrics.jsonl").is_file()
    short = CliRunner().invoke(app, [*args[:-1], str(tmp_path / "other.jsonl"), "--prefix-tokens", "5000"])
    assert short.exit_code == 2 and "not more than --prefix-tokens 5000" in short.output


# --- agreement on generations ------------------------------------------------------------------------
def test_generation_agreement_equals_a_direct_count(tiny_llama):
    model, tokenizer = load_pretrained(str(tiny_llama))
    model.eval()
    adapter = adapter_for(model)
    space = adapter.space({"depth": [2, 4]})
    prompts = [tokenizer("What is 2 plus 3?")["input_ids"], tokenizer("Spell it")["input_ids"]]

    def greedy(chunk):
        out = []
        for p in chunk:
            ids = model.generate(torch.tensor([p]), max_new_tokens=7, do_sample=False, pad_token_id=0)
            out.append(ids[0, len(p):].tolist())
        return out

    examples = generation_examples(greedy, prompts)
    rows = evaluate_exits(adapter, space, examples, tokenizer.pad_token_id, batch_size=1)
    hits = hits2 = hits4 = count = 0
    shallow = adapter.extract(SubnetSpec({"depth": 2}))
    for p, ex in zip(prompts, examples):
        new = ex.input_ids[len(p):]
        logits = shallow(torch.tensor([ex.input_ids])).logits[0]
        for i, token in enumerate(new):
            # the token's rank among the exit's logits: how many tokens score above it
            rank = int((logits[len(p) - 1 + i] > logits[len(p) - 1 + i, token]).sum())
            hits, hits2, hits4 = hits + (rank == 0), hits2 + (rank < 2), hits4 + (rank < 4)
            count += 1
    assert rows[0]["tokens"] == count
    assert rows[0]["top1_accuracy"] == pytest.approx(hits / count)
    assert rows[0]["top2_accuracy"] == pytest.approx(hits2 / count)
    assert rows[0]["top4_accuracy"] == pytest.approx(hits4 / count)
    assert hits < hits2 <= hits4  # the check can tell the three apart on this model
    assert rows[1]["top1_accuracy"] == pytest.approx(1.0)  # the full depth agrees with its own greedy output
