"""Training under torchrun: FSDP2 on two CPU processes (gloo) retraces one process at grad_accum 2.

The integration test launches `torchrun --nproc-per-node 2 -m manyinone train` twice (2 steps, then a
resume to 4 from the torch distributed checkpoint) and compares losses and final weights with one
uninterrupted single-process run of 4 steps. Same float32 math, gradients averaged over ranks instead
of over micro-batches: losses agree to relative 1e-5; weights to absolute 1e-5 (1% of one Adam
update at lr 1e-3: Adam's normalisation magnifies summation-order noise in tiny gradients).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from manyinone.train.config import TrainConfig
from manyinone.train.distributed import Runtime, decoder_layers, micro_batch_start, restore_state, world_size_from_env
from manyinone.core.errors import ManyinoneError
from manyinone.io.durable import write_checksums
from manyinone.io.integrity import verify_checksums
from manyinone.train.loop import train


def _covered(world: int, grad_accum: int, batch: int, step: int) -> list[list[int]]:
    """Example indices per (micro, rank) in launch order."""
    out = []
    for micro in range(grad_accum):
        for rank in range(world):
            first = micro_batch_start(step, micro, grad_accum, batch, world, rank)
            out.append(list(range(first, first + batch)))
    return out


def test_ranks_split_a_step_like_gradient_accumulation():
    for step in range(3):
        assert _covered(2, 1, 4, step) == _covered(1, 2, 4, step)
        assert _covered(2, 2, 3, step) == _covered(1, 4, 3, step)
    # Single process: the formula train.py always had.
    assert micro_batch_start(5, 1, 3, 8, 1, 0) == (5 * 3 + 1) * 8


def test_single_process_runtime_is_inert(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    rt = Runtime.from_env()
    assert (rt.world, rt.rank, rt.distributed, rt.is_main) == (1, 0, False, True)
    assert rt.mean({"loss": 2.5}) == {"loss": 2.5} and rt.total(7) == 7
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ManyinoneError, match="WORLD_SIZE='two'"):
        world_size_from_env()


def test_decoder_layers_found_by_the_models_own_class_names(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert decoder_layers(model) == list(model.model.layers)
    with pytest.raises(ManyinoneError, match="names no decoder layer class"):
        decoder_layers(nn.Linear(2, 2))


def _two_processes(program: list[str], tmp_path) -> subprocess.CompletedProcess:
    """`program` (a script and its arguments, or -m MODULE ...) on 2 processes under torchrun."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *program]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)


def _torchrun(cfg_args: list[str], tmp_path) -> subprocess.CompletedProcess:
    return _two_processes(["-m", "manyinone", "train", "--quiet", *cfg_args], tmp_path)


def _losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_two_process_fsdp2_run_equals_one_process_and_resumes(tiny_llama, tmp_path):
    common = dict(model=str(tiny_llama), exits=[2, 4], data="demo", batch_size=2, lr=1e-3, device="cpu",
                  distill_weight=0.5, min_lr_ratio=1.0)  # constant lr: a 2-step run then 2 more = 4 steps
    ref = train(TrainConfig(**common, grad_accum=2, max_steps=4, output=str(tmp_path / "one")), show_progress=False)

    two = tmp_path / "two"
    args = ["--model", str(tiny_llama), "--exits", "2,4", "--batch-size", "2", "--lr", "1e-3", "--output", str(two),
            "--set", "device=cpu", "--set", "distill_weight=0.5", "--set", "min_lr_ratio=1.0", "--set", "gradient_checkpointing=true"]
    first = _torchrun([*args, "--max-steps", "2"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (first.stdout + first.stderr).count("checkpoint written to") == 1  # rank 0 alone reports
    state = json.loads((two / "checkpoints" / "step-0000002" / "state.json").read_text())
    assert state == {"step": 2, "format": "dcp", "world": 2}
    assert verify_checksums(two / "checkpoints" / "step-0000002", "resume checkpoint")  # shards + state.json listed
    resumed = _torchrun([*args, "--max-steps", "4"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step 2" in resumed.stderr

    assert _losses(two) == pytest.approx(_losses(ref), rel=1e-5, abs=1e-6)
    want, got = load_file(ref / "model.safetensors"), load_file(two / "model.safetensors")
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5)
    assert json.loads((two / "manyinone.json").read_text())["specs"] == json.loads((ref / "manyinone.json").read_text())["specs"]
    for name in ("config.json", "generation_config.json"):  # rank 0 writes from an empty skeleton, not a reload
        assert (two / name).is_file() == (ref / name).is_file()
        if (ref / name).is_file():
            assert json.loads((two / name).read_text()) == json.loads((ref / name).read_text()), name



@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
@pytest.mark.parametrize("kind", ["translator", "block", "layer"])
def test_exit_heads_train_under_fsdp2_as_on_one_process(tiny_llama, tmp_path, kind):
    """Exit modules hang on the model before sharding, so FSDP2 shards them and averages their
    gradients with the rest; the final checkpoint's exit heads equal one process's."""
    common = dict(model=str(tiny_llama), exits=[2, 4], data="demo", batch_size=2, lr=1e-3, device="cpu",
                  min_lr_ratio=1.0, exit_heads=kind)
    ref = train(TrainConfig(**common, grad_accum=2, max_steps=3, output=str(tmp_path / "one")), show_progress=False)
    two = tmp_path / "two"
    done = _torchrun(["--model", str(tiny_llama), "--exits", "2,4", "--batch-size", "2", "--lr", "1e-3", "--output",
                      str(two), "--max-steps", "3", "--set", "device=cpu", "--set", "min_lr_ratio=1.0",
                      "--set", f"exit_heads={kind}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _losses(two) == pytest.approx(_losses(ref), rel=1e-5, abs=1e-6)
    for name in ("model.safetensors", "exit_heads.safetensors"):
        want, got = load_file(ref / name), load_file(two / name)
        assert set(got) == set(want), name
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("content", ['{"step": 2, "format": "dc', "", '{"format": "dcp", "world": 2}'])
def test_a_damaged_state_json_is_a_clean_error(tmp_path, content):
    """restore_state reads state.json through checkpoint.read_resume_state: a one-line error, no JSONDecodeError."""
    last = tmp_path / "checkpoints" / "step-0000002"
    last.mkdir(parents=True)
    (last / "state.json").write_text(content)
    write_checksums(last)  # listed as written: the damage is in state.json itself, not a missing listing
    with pytest.raises(ManyinoneError, match=r"resume checkpoint .*step-0000002' is corrupt .*delete it"):
        restore_state(Runtime(), tmp_path, nn.Linear(2, 2), None)


def _probe(folder, mode: str, tmp_path) -> list[dict]:
    probe = os.path.join(os.path.dirname(__file__), "sharded_load_probe.py")
    out = tmp_path / f"probe-{mode}"
    out.mkdir()
    done = _two_processes([probe, str(folder), mode, str(out)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
@pytest.mark.parametrize("tie", [False, True])
def test_each_rank_reads_only_its_own_shards(tmp_path, tie):
    """The sharded load gives every rank the file's weights and the constructor's buffers while its
    peak memory grows by well under what loading the whole model first costs, measured side by side
    (a 45M-parameter model: 180 MB in float32, so the gap stands far above the processes' noise)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from helpers import make_char_tokenizer

    config = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=tie)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(tmp_path / "model")
    make_char_tokenizer().save_pretrained(tmp_path / "model")

    sharded, whole = _probe(tmp_path / "model", "sharded", tmp_path), _probe(tmp_path / "model", "whole", tmp_path)
    for rank in sharded:
        assert rank["names_equal"] and rank["all_equal"] and rank["buffers_equal"], rank
        assert rank["local_fraction"] == pytest.approx(0.5, abs=0.01)  # half of every tensor's rows
    for mine, old in zip(sharded, whole):
        assert mine["peak_growth_mib"] < 0.7 * old["peak_growth_mib"], (mine, old)


def test_a_damaged_weight_file_is_a_one_line_error_in_the_sharded_load(tiny_llama, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    (broken / "model.safetensors").write_bytes(b"\xff" * 64)  # no valid header
    with pytest.raises(ManyinoneError, match="cannot load model from"):
        Runtime().load_sharded(str(broken), torch.float32, torch.device("cpu"))  # fails before any sharding
