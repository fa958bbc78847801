"""Export: one budget as a plain HF model, all budgets as one indexed checkpoint; atomic writes."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import manyinone
import manyinone.checkpoint as checkpoint
from helpers import max_abs_diff, sample_batch
from manyinone.checkpoint import read_index
from manyinone.dims import SubnetSpec
from manyinone.errors import ManyinoneError
from manyinone.export import export_all, export_budget

TOL = 1e-5


@pytest.fixture(params=["untied", "tied"])
def run(request):
    """A trained run folder: untied head with exits 2,4; tied head with exits 1,2,3,4."""
    return request.getfixturevalue({"untied": "trained_run", "tied": "trained_run_tied"}[request.param])


def relative_flops(ckpt: Path) -> dict[int, float]:
    """depth -> relative FLOPs, from the checkpoint's index."""
    return {e["spec"]["depth"]: e["relative"]["flops"] for e in read_index(ckpt)["specs"]}


@torch.no_grad()
def logits(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask).logits  # [batch, seq, vocab]


@torch.no_grad()
def nested_exit_logits(ckpt: Path, depth: int, ids, mask):
    nested = manyinone.open_checkpoint(ckpt)
    spec = SubnetSpec(depth=depth)
    hidden = nested.adapter.forward_nested(ids, mask, [spec])[spec]
    return nested.adapter.exit_logits(hidden)


def leftovers(parent: Path) -> list[str]:
    """Temp or backup folders an atomic write may leave beside its target."""
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# --- one budget -----------------------------------------------------------------------------------
def test_export_budget_loads_in_plain_transformers_with_equal_logits(run, tmp_path):
    budget = relative_flops(run)[2]
    out = export_budget(run, budget, tmp_path / "exported")
    ids, mask = sample_batch()
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert plain.config.num_hidden_layers == 2 and len(plain.model.layers) == 2
    served = manyinone.load(run, budget=budget)
    assert served.manyinone_spec == SubnetSpec(depth=2)
    reference = logits(served, ids, mask)
    assert max_abs_diff(logits(plain, ids, mask), reference) <= TOL
    assert max_abs_diff(nested_exit_logits(run, 2, ids, mask), reference) <= TOL


def test_export_every_architecture_without_training(any_tiny_model, tmp_path):
    """llama (tied/untied), mistral (sliding window) and qwen2 (mixed layer types) export at depth 3."""
    from manyinone.checkpoint import build_index, save_checkpoint
    from manyinone.loading import load_pretrained
    from manyinone.registry import adapter_for

    model, tokenizer = load_pretrained(str(any_tiny_model))
    adapter = adapter_for(model.eval())
    ckpt = save_checkpoint(model, tokenizer, build_index(adapter, adapter.space({"depth": [1, 3]})), tmp_path / "ckpt")
    out = export_budget(ckpt, relative_flops(ckpt)[3], tmp_path / "depth3")
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert plain.config.num_hidden_layers == 3
    if getattr(model.config, "layer_types", None):
        assert plain.config.layer_types == model.config.layer_types[:3]
    ids, mask = sample_batch(seed=3)
    assert max_abs_diff(logits(plain, ids, mask), nested_exit_logits(ckpt, 3, ids, mask)) <= TOL


def test_export_budget_between_exits_takes_the_largest_fitting(trained_run, tmp_path):
    costs = relative_flops(trained_run)
    out = export_budget(trained_run, (costs[2] + costs[4]) / 2, tmp_path / "mid")
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2


def test_export_budget_files_and_index(trained_run, tmp_path):
    source = read_index(trained_run)
    entry = next(e for e in source["specs"] if e["spec"] == {"depth": 2})
    budget = entry["relative"]["flops"]
    out = export_budget(trained_run, budget, tmp_path / "exported")

    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "manyinone.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2

    index = json.loads((out / "manyinone.json").read_text())
    assert index["exported"]["spec"] == {"depth": 2} and index["exported"]["budget"] == budget
    assert index["space"] == {"depth": {"total": 2, "choices": [2]}}
    [spec] = index["specs"]
    assert spec["spec"] == {"depth": 2}
    assert spec["params"] == entry["params"] and spec["flops_per_token"] == entry["flops_per_token"]
    assert spec["relative_to_source"] == entry["relative"]
    assert spec["relative"] == {"params": 1.0, "flops": 1.0}  # the exported model is its own full model
    assert read_index(out) == index  # the safetensors metadata carries the same index

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert json.loads(f.metadata()["manyinone"]) == index
    assert not any(k.startswith(("model.layers.2.", "model.layers.3.")) for k in keys)
    assert "model.layers.1.mlp.down_proj.weight" in keys

    tok = AutoTokenizer.from_pretrained(out)
    original = AutoTokenizer.from_pretrained(trained_run)
    text = "What is 2 plus 2?\n"
    assert tok(text)["input_ids"] == original(text)["input_ids"] and tok.pad_token == "<pad>"


def test_exported_checkpoint_serves_itself(trained_run, tmp_path):
    out = export_budget(trained_run, relative_flops(trained_run)[2], tmp_path / "exported")
    model = manyinone.load(out)  # budget None: its only (full) spec
    assert model.manyinone_spec == SubnetSpec(depth=2) and model.config.num_hidden_layers == 2
    with pytest.raises(ManyinoneError, match="below the smallest"):
        manyinone.load(out, budget=0.5)


def test_export_bad_budget_writes_nothing(trained_run, tmp_path):
    for budget in (0, 1.5, 0.01):
        with pytest.raises(ManyinoneError):
            export_budget(trained_run, budget, tmp_path / "never")
    assert list(tmp_path.iterdir()) == []


# --- all budgets ------------------------------------------------------------------------------------
def test_export_all_serves_every_budget_like_the_training_checkpoint(run, tmp_path):
    out = export_all(run, tmp_path / "all")
    ids, mask = sample_batch(seed=2)
    budgets = list(relative_flops(run).values()) + [None]
    for budget in budgets:
        mine, theirs = manyinone.load(out, budget=budget), manyinone.load(run, budget=budget)
        assert mine.manyinone_spec == theirs.manyinone_spec
        assert max_abs_diff(logits(mine, ids, mask), logits(theirs, ids, mask)) <= TOL, budget
    assert read_index(out) == read_index(run)
    # Plain transformers loads it as the full model.
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert max_abs_diff(logits(plain, ids, mask), logits(manyinone.load(run), ids, mask)) <= TOL


def test_export_all_stores_every_tensor_once_with_the_index(run, tmp_path):
    out = export_all(run, tmp_path / "all")
    model = AutoModelForCausalLM.from_pretrained(out)
    unique = {p.data_ptr(): p for p in model.state_dict().values()}
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        stored = sum(math.prod(f.get_slice(k).get_shape()) for k in keys)
        meta = f.metadata()
    assert len(keys) == len(unique)  # a tied head and embedding are one tensor in the file
    assert stored == sum(t.numel() for t in unique.values())
    # No per-budget copies: the file holds the full model's tensors and nothing else.
    assert not any("depth" in k for k in keys)
    assert json.loads(meta["manyinone"]) == json.loads((out / "manyinone.json").read_text())
    assert len(json.loads(meta["manyinone"])["specs"]) == len(relative_flops(run))


def test_tied_checkpoint_stores_the_shared_matrix_once(trained_run_tied):
    with safe_open(str(trained_run_tied / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert len(keys & {"lm_head.weight", "model.embed_tokens.weight"}) == 1
    model = AutoModelForCausalLM.from_pretrained(trained_run_tied)
    assert model.lm_head.weight is model.model.embed_tokens.weight


# --- atomic writes ------------------------------------------------------------------------------------
def _failing_save(*_args, **_kwargs):
    raise OSError("simulated: disk full")


@pytest.mark.parametrize("do_export", [
    lambda ckpt, out: export_budget(ckpt, 1.0, out),
    lambda ckpt, out: export_all(ckpt, out),
], ids=["budget", "all"])
def test_failed_export_leaves_no_output_and_no_temp(trained_run, tmp_path, monkeypatch, do_export):
    monkeypatch.setattr(checkpoint, "save_model", _failing_save)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        do_export(trained_run, out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_export_keeps_the_previous_output(trained_run, tmp_path, monkeypatch):
    out = export_budget(trained_run, 1.0, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(checkpoint, "save_model", _failing_save)
    with pytest.raises(OSError):
        export_budget(trained_run, relative_flops(trained_run)[2], out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(tmp_path) == []


def test_export_replaces_existing_output_cleanly(trained_run, tmp_path):
    """An earlier export is replaced whole, files the new one lacks included (foreign files are refused:
    tests/reliability/test_data_loss.py)."""
    out = export_all(trained_run, tmp_path / "out")
    (out / "eval.json").write_text("[]")  # a report of the earlier export: stale once it is replaced
    export_budget(trained_run, relative_flops(trained_run)[2], out)
    names = {p.name for p in out.iterdir()}
    assert "eval.json" not in names and "model.safetensors" in names
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    assert leftovers(tmp_path) == []
    # Exporting another budget over it replaces it again.
    export_budget(trained_run, 1.0, out)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    assert leftovers(tmp_path) == [] and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_open_checkpoint_on_a_missing_or_foreign_folder(tmp_path, tiny_llama):
    with pytest.raises(ManyinoneError, match="not found"):
        manyinone.load(tmp_path / "missing")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    with pytest.raises(ManyinoneError, match="not a manyinone checkpoint"):
        read_index(foreign)
    # A plain HF folder has weights but no budget index in their metadata.
    with pytest.raises(ManyinoneError, match="corrupt"):
        read_index(tiny_llama)


def test_index_of_unknown_format(trained_run, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_run, ckpt)
    index = json.loads((ckpt / "manyinone.json").read_text())
    (ckpt / "manyinone.json").write_text(json.dumps({**index, "format": "manyinone/99"}))
    with pytest.raises(ManyinoneError, match="unknown format"):
        read_index(ckpt)


def test_corrupt_weights_raise_a_clear_error(trained_run, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_run, ckpt, ignore=shutil.ignore_patterns("checkpoints"))
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ManyinoneError, match="corrupt or incomplete"):
        manyinone.load(ckpt, budget=1.0)
    (ckpt / "manyinone.json").unlink()  # now the index can only come from the damaged file
    with pytest.raises(ManyinoneError, match="unreadable"):
        read_index(ckpt)
