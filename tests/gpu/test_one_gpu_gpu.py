"""CUDA: the one-GPU recipes for large models on the tiny model: LoRA on a bf16 base, bf16 weights
with torchao's 8-bit AdamW (stochastic rounding), each learning and resuming exactly.

Skipped without CUDA (and the torchao test without torchao).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from manyinone.train.config import TrainConfig
from manyinone.train.loop import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

RECIPES = {
    "lora-bf16": dict(lora={"r": 8}, lr=1e-2),  # dtype auto: bfloat16 with lora on CUDA
    "adamw8bit-bf16": dict(dtype="bfloat16", optimizer="adamw8bit", lr=3e-3),
}


def config(model, output, recipe: str, **fields) -> TrainConfig:
    return TrainConfig(model=str(model), exits=[2, 4], data="demo", batch_size=4, device="cuda",
                       output=str(output), min_lr_ratio=1.0, **RECIPES[recipe], **fields)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_one_gpu_recipe_learns_and_resumes_exactly(tiny_llama, tmp_path, recipe):
    if recipe == "lora-bf16":
        pytest.importorskip("peft")
    else:
        pytest.importorskip("torchao")
    straight = train(config(tiny_llama, tmp_path / "straight", recipe, max_steps=8), show_progress=False)
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    for label in ("depth=2", "depth=4"):
        ce = [r[f"ce/{label}"] for r in records]
        assert all(math.isfinite(x) for x in ce) and sum(ce[-3:]) / 3 < ce[0] - 0.2, (recipe, label, ce)
    weights = load_file(str(straight / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    resumed = tmp_path / "resumed"
    train(config(tiny_llama, resumed, recipe, max_steps=4), show_progress=False)
    train(config(tiny_llama, resumed, recipe, max_steps=8), show_progress=False)
    again = load_file(str(resumed / "model.safetensors"))
    # Bitwise on CPU (tests/test_lora.py); on CUDA, atomics in some backward kernels may move a bf16
    # ulp, so the resumed run must match to within a few ulps, not a different training trajectory.
    far = [k for k in weights if (weights[k].float() - again[k].float()).abs().max() > 0.02 * weights[k].float().abs().max()]
    assert far == [], far
