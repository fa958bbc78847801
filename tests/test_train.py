"""The training loop on the tiny model: learning, exact resume, metrics, schedule, options."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import manyinone.train.loop as train_module
from manyinone.train.config import TrainConfig
from manyinone.train.data import load_records, tokenize_records
from manyinone.core.space import DepthDim, NestedSpace
from manyinone.core.errors import ManyinoneError
from manyinone.eval.evaluate import evaluate_exits
from manyinone.io.loading import load_pretrained
from manyinone.core.registry import adapter_for
from manyinone.train.samplers import RandomK, Sandwich
from manyinone.train.loop import lr_at, train

# Short examples keep each step cheap; the demo prompts are ~170 characters, responses ~20.
FAST = dict(data="demo", batch_size=2, max_length=200, lr=1e-3)


def config(model: Path, output: Path | str, **fields) -> TrainConfig:
    return TrainConfig(**{"model": str(model), "exits": [2, 4], **FAST, "output": str(output), **fields})


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == []


# --- it learns ------------------------------------------------------------------------------------
def test_loss_decreases_on_demo_data(tiny_llama, tmp_path):
    run = train(config(tiny_llama, tmp_path / "run", batch_size=4, max_length=512, lr=3e-3, max_steps=10),
                show_progress=False)
    records = metrics(run)
    for label in ("depth=2", "depth=4"):
        ce = [r[f"ce/{label}"] for r in records]
        assert all(math.isfinite(x) for x in ce)
        assert ce[0] == pytest.approx(math.log(100), abs=0.1)  # a random init guesses uniformly
        assert sum(ce[-3:]) / 3 < ce[0] - 0.3, (label, ce)


def test_held_out_loss_improves_at_every_exit(tiny_llama, trained_run):
    """The 4-step run of conftest, scored on demo records it never saw, against the untrained model."""
    space = NestedSpace([DepthDim(total=4, choices=(2, 4))])
    loss = {}
    for name, source in (("before", tiny_llama), ("after", trained_run)):
        model, tokenizer = load_pretrained(str(source))
        examples = tokenize_records(load_records("demo", "380:400"), tokenizer, 512)
        rows = evaluate_exits(adapter_for(model), space, examples, tokenizer.pad_token_id, batch_size=10)
        loss[name] = {r["spec"]: r["loss"] for r in rows}
    for label in ("depth=2", "depth=4"):
        assert loss["after"][label] < loss["before"][label] - 0.1, loss


# --- metrics ----------------------------------------------------------------------------------------
def test_metrics_one_line_per_step_with_ce_per_exit(trained_run):
    records = metrics(trained_run)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    cfg = TrainConfig(max_steps=4, lr=1e-3)
    for r in records:
        assert {"ce/depth=2", "ce/depth=4", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"} <= set(r)
        assert not any(k.startswith("kl/") for k in r)
        assert r["loss"] == pytest.approx(r["ce/depth=2"] + r["ce/depth=4"], rel=1e-5)  # weights all 1
        assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, cfg, 4))
        assert r["tokens"] > 0 and r["grad_norm"] > 0
        assert r["epoch"] == pytest.approx(r["step"] / 100)  # 400 demo records / batch 4


def test_run_folder_contents(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {"config.json", "model.safetensors", "manyinone.json", "metrics.jsonl", "train_config.yaml",
            "tokenizer.json", "checkpoints"} <= names
    index = json.loads((trained_run / "manyinone.json").read_text())
    assert index["train"]["steps"] == 4 and index["train"]["data"] == "demo"
    assert [e["spec"] for e in index["specs"]] == [{"depth": 2}, {"depth": 4}]
    assert [p.name for p in (trained_run / "checkpoints").iterdir()] == ["step-0000004"]
    assert not any(".tmp-" in p.name for p in trained_run.parent.iterdir())


# --- learning-rate schedule -----------------------------------------------------------------------------
def test_lr_warmup_then_cosine_by_hand():
    cfg = TrainConfig(lr=1.0, warmup_steps=2)
    got = [lr_at(step, cfg, total_steps=6) for step in range(6)]
    # warm-up: 1/2, 2/2; cosine over the remaining 4 steps: 0.5 * (1 + cos(pi * k / 4)), k = 0..3.
    expected = [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))]
    assert got == pytest.approx(expected)
    assert expected[3] == pytest.approx(0.853553, abs=1e-6) and expected[5] == pytest.approx(0.146447, abs=1e-6)


def test_lr_cosine_floor():
    cfg = TrainConfig(lr=2.0, min_lr_ratio=0.1)
    # No warm-up: 0.2 + 1.8 * 0.5 * (1 + cos(pi * step / 4)).
    assert [lr_at(s, cfg, 4) for s in range(4)] == pytest.approx([2.0, 0.2 + 0.9 * (1 + math.sqrt(0.5)), 1.1,
                                                                  0.2 + 0.9 * (1 - math.sqrt(0.5))])
    assert lr_at(4, cfg, 4) == pytest.approx(0.2) and lr_at(10, cfg, 4) == pytest.approx(0.2)


def test_lr_constant_with_floor_one():
    cfg = TrainConfig(lr=3e-4, min_lr_ratio=1.0)
    assert all(lr_at(s, cfg, 10) == pytest.approx(3e-4) for s in range(10))


# --- resume -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def uninterrupted(tiny_llama, tmp_path_factory):
    """Six steps with warm-up and cosine decay, resumable state every 3 steps."""
    out = tmp_path_factory.mktemp("resume") / "straight"
    return train(config(tiny_llama, out, max_steps=6, save_every=3, warmup_steps=1), show_progress=False)


def _crash_after_step(monkeypatch, crash_step: int):
    """Make the loop die right after optimizer step `crash_step`, before anything else of it is saved."""
    original = train_module.TrainProgress.update

    def update(self, step, record):
        original(self, step, record)
        if step == crash_step:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(train_module.TrainProgress, "update", update)


def test_interrupted_run_resumes_bitwise_equal(tiny_llama, uninterrupted, tmp_path, monkeypatch):
    out = tmp_path / "crashy"
    cfg = config(tiny_llama, out, max_steps=6, save_every=3, warmup_steps=1)
    with monkeypatch.context() as patch:
        _crash_after_step(patch, 5)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(cfg, show_progress=False)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000003"]
    assert not (out / "model.safetensors").exists()  # no final checkpoint from the crashed run
    train(cfg, show_progress=False)  # the same command again resumes after step 3
    assert_bitwise_equal(weights(out), weights(uninterrupted))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000003", "step-0000006"]


def test_resumed_run_has_one_metrics_line_per_step(tiny_llama, tmp_path, monkeypatch):
    out = tmp_path / "crashy"
    cfg = config(tiny_llama, out, max_steps=4, save_every=2)
    with monkeypatch.context() as patch:
        _crash_after_step(patch, 3)
        with pytest.raises(RuntimeError):
            train(cfg, show_progress=False)
    train(cfg, show_progress=False)
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]  # got [1, 2, 3, 3, 4]


def test_extending_a_finished_run_with_constant_lr_is_bitwise_equal(tiny_llama, tmp_path):
    """The final checkpoint doubles as resumable state: max_steps=3, then the same run with max_steps=6.

    (With a decaying schedule the two differ by design: the schedule spans max_steps.)
    """
    constant = dict(min_lr_ratio=1.0)
    straight = train(config(tiny_llama, tmp_path / "straight", max_steps=6, **constant), show_progress=False)
    out = tmp_path / "extended"
    train(config(tiny_llama, out, max_steps=3, **constant), show_progress=False)
    first = weights(out)
    train(config(tiny_llama, out, max_steps=6, **constant), show_progress=False)
    assert_bitwise_equal(weights(out), weights(straight))
    assert not all(torch.equal(first[k], weights(out)[k]) for k in first)  # it really trained on
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5, 6]


def test_resume_is_exact_with_dropout(tmp_path):
    from transformers import AutoModelForCausalLM

    from helpers import make_char_tokenizer, tiny_config

    model_dir = tmp_path / "dropout-model"
    torch.manual_seed(0)
    cfg = tiny_config("llama")
    cfg.attention_dropout = 0.2
    AutoModelForCausalLM.from_config(cfg).save_pretrained(model_dir)
    make_char_tokenizer().save_pretrained(model_dir)
    constant = dict(min_lr_ratio=1.0)
    straight = train(config(model_dir, tmp_path / "straight", max_steps=4, **constant), show_progress=False)
    out = tmp_path / "resumed"
    train(config(model_dir, out, max_steps=2, **constant), show_progress=False)
    train(config(model_dir, out, max_steps=4, **constant), show_progress=False)
    assert_bitwise_equal(weights(out), weights(straight))


def test_rerunning_a_finished_run_changes_nothing(tiny_llama, tmp_path):
    cfg = config(tiny_llama, tmp_path / "run", max_steps=2)
    run = train(cfg, show_progress=False)
    before = weights(run)
    train(cfg, show_progress=False)
    assert_bitwise_equal(weights(run), before)
    assert len(metrics(run)) == 2


def test_resume_with_other_settings_is_refused(tiny_llama, tmp_path):
    run = train(config(tiny_llama, tmp_path / "run", max_steps=2), show_progress=False)
    before = weights(run)
    with pytest.raises(ManyinoneError) as err:
        train(config(tiny_llama, run, max_steps=2, lr=5e-3), show_progress=False)
    assert "different settings ['lr']" in str(err.value) and "new --output" in str(err.value)
    assert_bitwise_equal(weights(run), before)
    # max_steps may change: that extends the run.
    train(config(tiny_llama, run, max_steps=3), show_progress=False)
    assert len(metrics(run)) == 3


@pytest.mark.parametrize("how", ["trailing-slash", "moved"])
def test_resume_accepts_the_same_run_under_another_path(tiny_llama, tmp_path, how):
    import shutil

    run = train(config(tiny_llama, tmp_path / "run", max_steps=2), show_progress=False)
    if how == "moved":
        target = tmp_path / "moved"
        shutil.move(str(run), str(target))
    else:
        target = str(run) + "/"  # a str: Path() would drop the slash
    train(config(tiny_llama, target, max_steps=3), show_progress=False)
    assert [r["step"] for r in metrics(Path(target))] == [1, 2, 3]


def test_keep_checkpoints_prunes_old_states(tiny_llama, tmp_path):
    run = train(config(tiny_llama, tmp_path / "run", max_steps=4, save_every=1, keep_checkpoints=2),
                show_progress=False)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000003", "step-0000004"]
    state = json.loads((run / "checkpoints" / "step-0000004" / "state.json").read_text())
    assert state == {"step": 4}


def test_corrupt_resume_state_is_a_clear_error(tiny_llama, tmp_path):
    run = train(config(tiny_llama, tmp_path / "run", max_steps=2), show_progress=False)
    (run / "checkpoints" / "step-0000002" / "optimizer.pt").write_bytes(b"garbage")
    with pytest.raises(ManyinoneError, match="resume checkpoint .*step-0000002.* is corrupt"):
        train(config(tiny_llama, run, max_steps=3), show_progress=False)


# --- options ------------------------------------------------------------------------------------------
def test_self_distillation_logs_kl_for_every_exit_but_the_teacher(tiny_llama, tmp_path):
    run = train(config(tiny_llama, tmp_path / "kd", max_steps=2, distill_weight=0.5, distill_temperature=2.0),
                show_progress=False)
    for r in metrics(run):
        assert "kl/depth=2" in r and "kl/depth=4" not in r
        assert r["kl/depth=2"] > 0
        assert r["loss"] == pytest.approx(r["ce/depth=2"] + r["ce/depth=4"] + 0.5 * r["kl/depth=2"], rel=1e-5)


def test_sandwich_sampler_trains_the_drawn_specs(tiny_llama, tmp_path):
    run = train(config(tiny_llama, tmp_path / "sw", exits=[1, 2, 3], max_steps=3, sampler="sandwich",
                       sampler_k=1, seed=5), show_progress=False)
    sampler = Sandwich(NestedSpace([DepthDim(total=4, choices=(1, 2, 3))]), seed=5, n_random=1)
    for r in metrics(run):
        trained = sorted(k for k in r if k.startswith("ce/"))
        assert trained == sorted(f"ce/{s.label}" for s in sampler.sample(r["step"] - 1))
        assert "ce/depth=1" in trained and "ce/depth=4" in trained and len(trained) == 3


def test_random_k_sampler_trains_the_drawn_specs(tiny_llama, tmp_path):
    run = train(config(tiny_llama, tmp_path / "rk", exits=[1, 2, 3], max_steps=3, sampler="random-k",
                       sampler_k=1, seed=2), show_progress=False)
    sampler = RandomK(NestedSpace([DepthDim(total=4, choices=(1, 2, 3))]), seed=2, k=1)
    for r in metrics(run):
        trained = sorted(k for k in r if k.startswith("ce/"))
        assert trained == sorted(f"ce/{s.label}" for s in sampler.sample(r["step"] - 1))
        assert "ce/depth=4" in trained and len(trained) == 2


def test_random_k_too_large_for_the_space_is_refused(tiny_llama, tmp_path):
    with pytest.raises(ManyinoneError, match="random-k: k=2 out of range; allowed 1..1"):
        train(config(tiny_llama, tmp_path / "rk", max_steps=1, sampler="random-k", sampler_k=2),
              show_progress=False)
    assert not (tmp_path / "rk").exists()


def test_exit_weights_scale_the_loss(tiny_llama, tmp_path):
    run = train(config(tiny_llama, tmp_path / "w", max_steps=2, exit_weights=[0.0, 2.0]), show_progress=False)
    for r in metrics(run):
        assert r["loss"] == pytest.approx(2.0 * r["ce/depth=4"], rel=1e-5)


def test_plain_sft_is_the_single_exit_case(tiny_llama, tmp_path):
    run = train(config(tiny_llama, tmp_path / "sft", exits=[4], max_steps=2, grad_accum=2), show_progress=False)
    records = metrics(run)
    assert all(sorted(k for k in r if k.startswith("ce/")) == ["ce/depth=4"] for r in records)
    assert all(r["loss"] == pytest.approx(r["ce/depth=4"], rel=1e-5) for r in records)
    assert [e["spec"] for e in json.loads((run / "manyinone.json").read_text())["specs"]] == [{"depth": 4}]


def test_gradient_checkpointing_matches_plain_training(tiny_llama, tmp_path):
    plain = train(config(tiny_llama, tmp_path / "plain", max_steps=2), show_progress=False)
    ckpt = train(config(tiny_llama, tmp_path / "gc", max_steps=2, gradient_checkpointing=True), show_progress=False)
    a, b = weights(plain), weights(ckpt)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert [r["ce/depth=2"] for r in metrics(plain)] == pytest.approx([r["ce/depth=2"] for r in metrics(ckpt)])


def test_too_few_examples_for_a_batch(tiny_llama, tmp_path):
    with pytest.raises(ManyinoneError, match=r"2 examples < batch_size\*grad_accum=4; lower the batch size"):
        train(config(tiny_llama, tmp_path / "small", rows="0:2", batch_size=4, max_length=512, max_steps=1),
              show_progress=False)
    assert not (tmp_path / "small").exists()


def test_bad_exit_weights_are_refused_before_writing(tiny_llama, tmp_path):
    with pytest.raises(ManyinoneError, match="need 2 non-negative numbers"):
        train(config(tiny_llama, tmp_path / "w", exit_weights=[1.0], max_steps=1), show_progress=False)
    assert not (tmp_path / "w").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_device_without_cuda(tiny_llama, tmp_path):
    with pytest.raises(ManyinoneError, match="CUDA is not available"):
        train(config(tiny_llama, tmp_path / "cuda", device="cuda", max_steps=1), show_progress=False)


def test_unknown_device(tiny_llama, tmp_path):
    with pytest.raises(ManyinoneError, match="device 'tpu9' unknown"):
        train(config(tiny_llama, tmp_path / "dev", device="tpu9", max_steps=1), show_progress=False)
