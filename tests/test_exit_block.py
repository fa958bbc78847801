"""exit_heads="block": a per-exit feed-forward block (h + mlp(norm(h))) before the translator, trained,
served and exported as one more plain HF decoder layer whose attention adds exactly zero."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import manyinone
from helpers import max_abs_diff, sample_batch
from manyinone.core.adapter import ModelAdapter
from manyinone.core.errors import ManyinoneError
from manyinone.core.registry import adapter_for
from manyinone.core.space import SubnetSpec
from manyinone.io.export import export_budget
from manyinone.train.config import TrainConfig
from manyinone.train.exit_heads import ExitHeads, for_adapter
from manyinone.train.loop import _param_groups, train

TOL = 1e-5


@pytest.fixture(scope="module")
def block_run(tiny_llama_tied, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "block"
    cfg = TrainConfig(model=str(tiny_llama_tied), exits=[2, 4], data="demo", max_steps=3, batch_size=4, lr=1e-2,
                      exit_heads="block", exit_heads_lr_scale=2.0, output=str(out))
    return train(cfg, show_progress=False)


def test_block_is_copied_from_the_first_skipped_layer_with_a_zero_output(tiny_llama):
    adapter = adapter_for(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32))
    heads = for_adapter(adapter, "block", adapter.space({"depth": [1, 2, 4]}))
    layers = adapter.decoder_stack().layers
    for depth in (1, 2):
        block = heads.blocks[f"depth_{depth}"]
        assert torch.equal(block.mlp.gate_proj.weight, layers[depth].mlp.gate_proj.weight)
        assert block.mlp.gate_proj.weight.data_ptr() != layers[depth].mlp.gate_proj.weight.data_ptr()  # a copy
        assert not block.mlp.down_proj.weight.any()
        assert layers[depth].mlp.down_proj.weight.any()  # the model's own layer is untouched


def test_block_run_trains_the_blocks_and_saves_them(block_run):
    nested = manyinone.open_checkpoint(block_run)
    assert nested.index["exit_heads"]["kind"] == "block"
    assert nested.exit_heads.blocks["depth_2"].mlp.down_proj.weight.abs().max() > 0  # trained away from zero
    plain = AutoModelForCausalLM.from_pretrained(block_run, dtype=torch.float32, output_loading_info=True)
    assert not plain[1]["unexpected_keys"] and not plain[1]["missing_keys"]  # the blocks live beside, not inside


def test_exported_block_exit_is_a_plain_model_one_layer_deeper_equal_to_the_nested_exit(block_run, tmp_path):
    nested = manyinone.open_checkpoint(block_run)
    spec = SubnetSpec(depth=2)
    ids, mask = sample_batch()
    with torch.no_grad():
        expected = nested.exit_logits(spec, nested.adapter.forward_nested(ids, mask, [spec])[spec])
    budget = next(e["relative"]["flops"] for e in nested.index["specs"] if e["spec"] == {"depth": 2})
    out = export_budget(block_run, budget, tmp_path / "b")
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert exported.config.num_hidden_layers == 3
    assert not exported.model.layers[2].self_attn.o_proj.weight.any()
    with torch.no_grad():
        got = exported(input_ids=ids, attention_mask=mask).logits
        served = manyinone.load(block_run, budget=budget)(input_ids=ids, attention_mask=mask).logits
        # the appended layer has its own KV-cache slot: cached greedy decoding equals the uncached forward
        prompt = ids[:1, :6]
        cached = exported.generate(prompt, max_new_tokens=6, do_sample=False, min_new_tokens=6)
        seq = prompt
        for _ in range(6):
            seq = torch.cat([seq, exported(input_ids=seq).logits[:, -1:].argmax(-1)], dim=1)
    assert max_abs_diff(got, expected, mask) <= TOL
    assert max_abs_diff(served, expected, mask) <= TOL
    assert torch.equal(cached, seq)
    # the full model was left alone by the export
    assert nested.model.config.num_hidden_layers == 4 and len(nested.model.model.layers) == 4


def test_blocks_train_at_the_body_rate_and_translators_at_theirs(tiny_llama):
    adapter = adapter_for(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32))
    heads = for_adapter(adapter, "block", adapter.space({"depth": [2, 4]}))
    cfg = TrainConfig(model=str(tiny_llama), exits=[2, 4], exit_heads="block", exit_heads_lr_scale=10.0)
    groups = _param_groups(adapter.model, heads, cfg)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert scale[id(heads.maps["depth_2"])] == 10.0
    assert scale[id(heads.blocks["depth_2"].mlp.up_proj.weight)] == 1.0
    assert len(scale) == sum(len(g["params"]) for g in groups)  # no parameter in two groups


def test_block_with_lora_is_refused():
    with pytest.raises(ValueError, match="exit_heads='block'.*LoRA"):
        TrainConfig(model="x", exit_heads="block", lora=8)


def test_block_needs_an_adapter_that_builds_blocks(tiny_llama):
    norm, weight = torch.nn.Identity(), torch.randn(7, 4)
    with pytest.raises(ManyinoneError, match="needs the model's adapter to build its blocks"):
        ExitHeads("block", [SubnetSpec(depth=1)], norm, weight)
    adapter = adapter_for(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32))
    with pytest.raises(ManyinoneError, match="serves depth exits only"):
        ExitHeads("block", [SubnetSpec(depth=1, width=8)], norm, weight, adapter.exit_block)
    with pytest.raises(ManyinoneError, match=r"exit_heads='block' needs decoder layers.*'bare' adapter offers none"):
        _BareAdapter.exit_block(_BareAdapter.__new__(_BareAdapter), 1)


class _BareAdapter(ModelAdapter):
    """An adapter that keeps ModelAdapter's defaults for exit blocks."""

    name = "bare"
    model_types = ()
    axes = ("depth",)
    space = forward_nested = exit_logits = cost = extract = None
