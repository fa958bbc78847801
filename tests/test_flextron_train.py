"""Elastic width/heads training through `manyinone train`, and export of a width budget to plain HF."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import manyinone
from helpers import max_abs_diff, sample_batch
from manyinone.io.checkpoint import read_index
from manyinone.train.config import TrainConfig
from manyinone.core.space import SubnetSpec
from manyinone.core.errors import ManyinoneError
from manyinone.io.export import export_budget
from manyinone.train.data import collate, load_records, tokenize_records
from manyinone.train.loop import train
from manyinone_flextron import LlamaFlextronAdapter


@pytest.fixture(scope="module")
def width_run(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "width"
    cfg = TrainConfig(model=str(tiny_llama), axes=["depth", "width", "heads"], exits=[2, 4], widths=[32, 64],
                      heads=[2], data="demo", max_steps=3, batch_size=4, lr=1e-3, sampler="sandwich",
                      distill_weight=0.5, calibration_batches=2, output=str(out))
    return train(cfg, show_progress=False)


def test_width_run_trains_sandwich_specs_and_indexes_every_combination(width_run):
    index = read_index(width_run)
    assert index["adapter"] == "llama-flextron"
    assert index["space"] == {"depth": {"total": 4, "choices": [2, 4]}, "width": {"total": 128, "choices": [32, 64, 128]},
                              "heads": {"total": 4, "choices": [2, 4]}}
    assert len(index["specs"]) == 12
    rows = [json.loads(line) for line in (width_run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    # Sandwich: the smallest and the full spec every step, distillation on every non-full spec.
    for row in rows:
        assert "ce/depth=2,heads=2,width=32" in row and "ce/depth=4,heads=4,width=128" in row
        assert "kl/depth=2,heads=2,width=32" in row and "kl/depth=4,heads=4,width=128" not in row


def test_training_started_from_importance_reordered_weights(tiny_llama, width_run):
    """The trained checkpoint's MLP rows are a permutation of the start's, not the identity."""
    start = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    cfg = TrainConfig(model=str(tiny_llama), axes=["width"], widths=[64], data="demo", max_steps=1, batch_size=4,
                      lr=1e-9, calibration_batches=2, output=str(width_run.parent / "tiny-lr"))
    moved = AutoModelForCausalLM.from_pretrained(train(cfg, show_progress=False), dtype=torch.float32)
    a, b = start.model.layers[0].mlp.up_proj.weight, moved.model.layers[0].mlp.up_proj.weight  # [128, 64]
    assert not torch.allclose(a, b, atol=1e-4)
    assert torch.allclose(a.sum(0), b.sum(0), atol=1e-4)  # the same rows, reordered (lr 1e-9: barely trained)
    # ... reordered by importance, not by any permutation (column sums would not tell): on the same
    # calibration batches the training run used, the moved model's neuron energies come out descending.
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    examples = tokenize_records(load_records("demo", None), tokenizer, cfg.max_length, cfg.template)
    calibration = [collate(examples[i:i + 4], tokenizer.pad_token_id) for i in (0, 4)]
    scores = _energy(moved, calibration)  # [128] neuron energies of layer 0
    assert torch.all(scores[:-1] >= scores[1:] * (1 - 1e-4))
    order = torch.sort(_energy(start, calibration), descending=True, stable=True).indices
    assert torch.allclose(a[order], b, atol=1e-4)  # exactly the importance order of the start


def _energy(model, calibration) -> torch.Tensor:
    """Layer 0's neuron scores summed over the calibration batches."""
    adapter = LlamaFlextronAdapter(model.eval())
    return sum(adapter.unit_importance(c["input_ids"], c["attention_mask"])[0]["width"] for c in calibration)


@torch.no_grad()
def test_budget_loads_and_exports_a_plain_smaller_model(width_run, tmp_path):
    index = read_index(width_run)
    entry = min((e for e in index["specs"] if e["spec"]["depth"] == 4 and e["spec"]["width"] == 64
                 and e["spec"]["heads"] == 2), key=lambda e: e["relative"]["flops"])
    budget = entry["relative"]["flops"]
    loaded = manyinone.load(width_run, budget=budget)
    assert loaded.manyinone_spec == SubnetSpec(depth=4, width=64, heads=2)
    out = export_budget(width_run, budget, tmp_path / "small")
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert (plain.config.intermediate_size, plain.config.num_attention_heads, plain.config.num_key_value_heads) == (64, 2, 1)
    ids, mask = sample_batch()
    nested = manyinone.open_checkpoint(width_run)
    spec = loaded.manyinone_spec
    reference = nested.adapter.exit_logits(nested.adapter.forward_nested(ids, mask, [spec])[spec])
    assert max_abs_diff(plain(input_ids=ids, attention_mask=mask).logits, reference) <= 1e-5
    assert max_abs_diff(loaded(input_ids=ids, attention_mask=mask).logits, reference) <= 1e-5
    assert sum(p.numel() for p in plain.parameters()) < sum(p.numel() for p in nested.model.parameters())


def test_bad_width_settings_are_one_line_errors(tiny_llama, tmp_path):
    with pytest.raises(ManyinoneError, match=r"heads choices \[3\]: need multiples of 2"):
        train(TrainConfig(model=str(tiny_llama), axes=["heads"], heads=[3], data="demo", max_steps=1,
                          output=str(tmp_path / "x")), show_progress=False)
    with pytest.raises(ManyinoneError, match=r"width choices \[500\]: \[500\] out of range; allowed 1..128"):
        train(TrainConfig(model=str(tiny_llama), axes=["width"], widths=[500], data="demo", max_steps=1,
                          output=str(tmp_path / "y")), show_progress=False)
    with pytest.raises(ManyinoneError, match="gradient checkpointing cannot train width"):
        train(TrainConfig(model=str(tiny_llama), axes=["width"], widths=[64], data="demo", max_steps=1,
                          batch_size=4, gradient_checkpointing=True, output=str(tmp_path / "z")), show_progress=False)


def test_export_by_measured_milliseconds(width_run, tmp_path):
    from typer.testing import CliRunner

    from manyinone.cli import app
    from manyinone.elastic.latency import index_budget_for_ms, save_table

    # A hand-made table: a layer costs width/64 ms plus heads/2 ms; 1 ms outside the layers.
    options = [(w, h) for w in (32, 64, 128) for h in (2, 4)]
    table = {"device": "test", "num_layers": 4, "rest_ms": 1.0,
             "layer_ms": {f"{w},{h}": w / 64 + h / 2 for w, h in options}}
    index = read_index(width_run)
    # depth 4, width 64, heads 2: 1 + 4 * (1 + 1) = 9 ms, the slowest spec within 9.5 ms
    budget = index_budget_for_ms(index, table, 9.5)
    want = next(e for e in index["specs"] if e["spec"] == {"depth": 4, "width": 64, "heads": 2})
    assert budget == want["relative"]["flops"]
    with pytest.raises(ManyinoneError, match=r"latency budget 2.0 ms is below the fastest sub-model \(4.00 ms on test\)"):
        index_budget_for_ms(index, table, 2.0)
    path = save_table(table, tmp_path / "latency.json")
    result = CliRunner().invoke(app, ["export", str(width_run), "--budget-ms", "9.5", "--latency", str(path),
                                      "--output", str(tmp_path / "fast")])
    assert result.exit_code == 0, result.output
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "fast")
    assert (exported.config.intermediate_size, exported.config.num_attention_heads) == (64, 2)
    bad = CliRunner().invoke(app, ["export", str(width_run), "--budget-ms", "9.5", "--output", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--budget-ms needs --latency" in bad.output
