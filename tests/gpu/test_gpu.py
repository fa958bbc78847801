"""CUDA: a few bf16-autocast training steps of the tiny model, and full-spec parity in float32.

Skipped on machines without CUDA.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import max_abs_diff, sample_batch
from manyinone.train.config import TrainConfig
from manyinone.core.space import SubnetSpec
from manyinone.core.registry import adapter_for
from manyinone.train.loop import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_training_on_cuda_with_bf16_autocast(tiny_llama, tmp_path):
    cfg = TrainConfig(model=str(tiny_llama), exits=[2, 4], data="demo", batch_size=4, max_steps=10, lr=3e-3,
                      device="cuda", output=str(tmp_path / "run"))
    run = train(cfg, show_progress=False)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 10 and all("peak_mem_gib" in r for r in records)
    for label in ("depth=2", "depth=4"):
        ce = [r[f"ce/{label}"] for r in records]
        assert all(math.isfinite(x) for x in ce), ce
        assert sum(ce[-3:]) / 3 < ce[0] - 0.3, (label, ce)
    # The final checkpoint is written from CPU tensors and loads anywhere.
    assert AutoModelForCausalLM.from_pretrained(run).model.layers[0].mlp.up_proj.weight.device.type == "cpu"


@torch.no_grad()
def test_full_spec_parity_on_cuda_float32(any_tiny_model):
    model = AutoModelForCausalLM.from_pretrained(any_tiny_model, dtype=torch.float32).to("cuda").eval()
    ids, mask = (t.to("cuda") for t in sample_batch())
    adapter = adapter_for(model)
    full = SubnetSpec(depth=4)
    nested = adapter.exit_logits(adapter.forward_nested(ids, mask, [full])[full])
    plain = model(input_ids=ids, attention_mask=mask).logits
    assert nested.device.type == "cuda"
    assert max_abs_diff(nested, plain) <= 1e-5
    # And each exit against its extracted plain model.
    for depth in (1, 2, 3):
        spec = SubnetSpec(depth=depth)
        exit_logits = adapter.exit_logits(adapter.forward_nested(ids, mask, [spec])[spec])
        sub = adapter.extract(spec)
        assert max_abs_diff(exit_logits, sub(input_ids=ids, attention_mask=mask).logits) <= 1e-5
