"""Checkpoints at 13B scale: sharded safetensors, `architectures` in every config, bf16 exports,
fast opens (sizes) against full verification (every byte's sha256)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import manyinone
from manyinone.cli import app
from manyinone.core.errors import ManyinoneError
from manyinone.core.registry import adapter_for
from manyinone.io import integrity
from manyinone.io.checkpoint import (SHARD_INDEX_FILE, WEIGHTS_FILE, build_index, is_checkpoint, read_index,
                                     rewrite_index, save_checkpoint)
from manyinone.io.export import export_all, export_budget

from helpers import make_char_tokenizer, sample_batch, tiny_config


def flip_byte(path: Path, at: float = 0.9) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def ckpt(trained_run, tmp_path) -> Path:
    return Path(shutil.copytree(trained_run, tmp_path / "ckpt", ignore=shutil.ignore_patterns("checkpoints")))


def logits(model) -> torch.Tensor:
    ids, mask = sample_batch()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


# --- sharding ----------------------------------------------------------------------------------------
def test_sharded_checkpoint_loads_everywhere(ckpt, tmp_path):
    from transformers import AutoModelForCausalLM

    every = export_all(ckpt, tmp_path / "every", max_shard_size=60_000)
    shards = sorted(p.name for p in every.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (every / WEIGHTS_FILE).exists()
    weight_map = json.loads((every / SHARD_INDEX_FILE).read_text())
    assert set(weight_map["weight_map"].values()) == set(shards)
    assert all((every / s).stat().st_size <= 60_000 + 10_000 for s in shards)  # a shard overshoots by one tensor at most
    assert is_checkpoint(every) and read_index(every) == read_index(ckpt)
    plain = AutoModelForCausalLM.from_pretrained(every, dtype=torch.float32)
    torch.testing.assert_close(logits(plain), logits(manyinone.load(ckpt)), rtol=0, atol=0)
    torch.testing.assert_close(logits(manyinone.load(every, budget=0.6)), logits(manyinone.load(ckpt, budget=0.6)),
                               rtol=0, atol=0)


def test_the_budget_index_of_a_sharded_checkpoint_is_read_from_its_weight_map(ckpt, tmp_path):
    every = export_all(ckpt, tmp_path / "every", max_shard_size=60_000)
    stored = json.loads(json.loads((every / SHARD_INDEX_FILE).read_text())["metadata"]["manyinone"])
    assert stored == json.loads((every / "manyinone.json").read_text())
    rewrite_index(every, lambda index: {**index, "context": 1024})  # both copies change together
    assert read_index(every)["context"] == 1024
    stored = json.loads(json.loads((every / SHARD_INDEX_FILE).read_text())["metadata"]["manyinone"])
    assert stored["context"] == 1024
    assert integrity.verify_checksums(every)


def test_a_malformed_shard_size_is_one_line(ckpt, tmp_path):
    with pytest.raises(ManyinoneError, match=r"max shard size '5 gigs' unreadable.*allowed a byte count or a size like 5GB"):
        export_all(ckpt, tmp_path / "every", max_shard_size="5 gigs")
    assert not (tmp_path / "every").exists()


# --- configs and dtypes ---------------------------------------------------------------------------------
def test_every_config_names_its_architecture(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    model.config.architectures = None  # as a model built from code or GGUF has it
    adapter = adapter_for(model)
    save_checkpoint(model, make_char_tokenizer(), build_index(adapter, adapter.space({"depth": [2, 4]})), tmp_path / "c")
    export_budget(tmp_path / "c", 0.6, tmp_path / "half")
    for folder in (tmp_path / "c", tmp_path / "half"):
        assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_bf16_export_is_bf16_and_close_to_float32(ckpt, tmp_path):
    from transformers import AutoModelForCausalLM

    half = export_budget(ckpt, 0.6, tmp_path / "half", dtype="bfloat16")
    assert {t.dtype for t in load_file(str(half / WEIGHTS_FILE)).values()} == {torch.bfloat16}
    assert json.loads((half / "config.json").read_text())["dtype"] == "bfloat16"
    bf16 = AutoModelForCausalLM.from_pretrained(half, dtype=torch.float32)
    reference = logits(manyinone.load(ckpt, budget=0.6))
    assert (logits(bf16) - reference).abs().max() < 0.1 * reference.abs().max()
    with pytest.raises(ManyinoneError, match=r"export dtype 'int8' unknown; allowed float32, bfloat16, float16"):
        export_budget(ckpt, 0.6, tmp_path / "int8", dtype="int8")


# --- fast open against full verification --------------------------------------------------------------
@pytest.fixture
def large_weights(monkeypatch):
    """Treat the tiny weights as large: the fast check hashes none of the weight files."""
    monkeypatch.setattr(integrity, "FAST_HASH_BYTES", 1 << 14)


def test_fast_open_detects_a_truncated_file(ckpt, large_weights):
    weights = ckpt / WEIGHTS_FILE
    assert weights.stat().st_size > integrity.FAST_HASH_BYTES
    weights.write_bytes(weights.read_bytes()[:-1])
    with pytest.raises(ManyinoneError, match=rf"checkpoint '{ckpt}' is corrupt or incomplete: {WEIGHTS_FILE} is "
                                             r"truncated \(\d+ bytes, checksums.json records \d+\)"):
        manyinone.load(ckpt)


def test_fast_open_still_hashes_small_files(ckpt, large_weights):
    flip_byte(ckpt / "config.json", 0.5)
    with pytest.raises(ManyinoneError, match="config.json is altered"):
        manyinone.load(ckpt)


def test_a_flipped_weight_byte_passes_the_fast_open_but_not_verify_or_export(ckpt, tmp_path, large_weights):
    flip_byte(ckpt / WEIGHTS_FILE)
    manyinone.load(ckpt)  # sizes match: the open does not read every byte (what `verify` is for)
    result = CliRunner().invoke(app, ["verify", str(ckpt)])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: checkpoint '{ckpt}' is corrupt or incomplete: {WEIGHTS_FILE} is altered "
        "(its sha256 differs from checksums.json)")
    with pytest.raises(ManyinoneError, match=f"{WEIGHTS_FILE} is altered"):
        export_budget(ckpt, 0.6, tmp_path / "half")
    assert not (tmp_path / "half").exists()


def test_verify_passes_every_folder_manyinone_writes(trained_run, tmp_path):
    half = export_budget(trained_run, 0.6, tmp_path / "half")
    for folder in (trained_run, half, trained_run / "checkpoints" / "step-0000004"):
        result = CliRunner().invoke(app, ["verify", str(folder)])
        assert result.exit_code == 0, result.output
        assert "listed files match their sha256" in result.output


def test_verify_of_a_folder_without_a_listing_is_one_line(tiny_llama, tmp_path):
    for folder, message in ((tiny_llama, "has no checksums.json"), (tmp_path / "nope", "not found")):
        result = CliRunner().invoke(app, ["verify", str(folder)])
        assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_plain_sharded_hf_folder_is_no_manyinone_checkpoint(tmp_path):
    """The user's 13B folder is sharded by transformers: it loads with nothing to verify."""
    from transformers import AutoModelForCausalLM

    from manyinone.io.loading import load_pretrained

    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    model.save_pretrained(tmp_path / "hf", max_shard_size="60KB")
    make_char_tokenizer().save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / SHARD_INDEX_FILE).is_file() and not is_checkpoint(tmp_path / "hf")
    loaded, _ = load_pretrained(str(tmp_path / "hf"))
    torch.testing.assert_close(logits(loaded), logits(model.eval()), rtol=0, atol=0)
