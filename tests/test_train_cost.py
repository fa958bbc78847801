"""benchmarks/train_cost.py: the one-GPU suite runs end to end at the tiny shape (the GPU run has no
second chance), and frozen weights count 4 FLOPs per parameter per token, trained ones 6."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def bench_module():
    spec = importlib.util.spec_from_file_location("train_cost", ROOT / "benchmarks" / "train_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_frozen_weights_count_four_flops_per_parameter():
    from transformers import AutoModelForCausalLM

    bench = bench_module()
    model = AutoModelForCausalLM.from_config(bench.model_config("tiny", 64))
    trained = bench.step_flops(model, 4, tokens=128, head_tokens=128, n_heads=1, seq=64)
    model.requires_grad_(False)
    frozen = bench.step_flops(model, 4, tokens=128, head_tokens=128, n_heads=1, seq=64)
    linear = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    head = model.lm_head.weight.numel()
    assert trained - frozen == 128 * 2 * (linear + head)  # 6 - 4 per weight, per token
    assert bench.step_flops(model, 4, 128, 128, 1, 64, as_trained=False) == trained


def test_one_gpu_suite_runs_at_the_tiny_shape(tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "rows.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "adapters"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_cost.py"), "--suite", "one-gpu", "--smoke",
                           "--json", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = proc.stdout[proc.stdout.index("| shape |"):].strip().splitlines()
    assert len(table) == 2 + 5 and not any("failed" in line for line in table), proc.stdout
    rows = json.loads(out.read_text())["rows"]
    plain, lora, full = rows[0], rows[1], rows[4]
    assert (plain["variant"], lora["variant"], full["variant"]) == ("soft", "lora-soft", "soft-8bit")
    assert lora["trained_params"] < full["trained_params"] / 2  # adapters only; the unload gave the base back
    assert plain["trained_params"] == full["trained_params"]
    assert lora["tflop_per_step"] < full["tflop_per_step"] * lora["batch"] / full["batch"]  # frozen: 4 not 6
