"""Exports as users' tools read them: the model card, GGUF (loaded back through transformers' GGUF
loader with equal logits), and the declared transformers floor (4.56) reading the same weights,
RoPE base and tokenizer as the newest release."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from manyinone.core.errors import ManyinoneError
from manyinone.io.api import open_checkpoint
from manyinone.io.export import export_all, export_budget, gguf_name
from manyinone.train.config import TrainConfig
from manyinone.train.loop import train

TEXT = "the quick brown fox jumps over the lazy dog; 12 plus 30 is 42. Spell stone backwards: enots."


def bpe_tokenizer():
    """A tiny GPT-2 style byte-level BPE (what SmolLM2 and most LLaMA-family models use), trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", model_input_names=["input_ids", "attention_mask"])


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory) -> Path:
    """A 1-step run of a 4-layer LLaMA (RoPE base 100000, not the default) with a BPE tokenizer, evaluated."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = bpe_tokenizer()
    folder = tmp_path_factory.mktemp("bpe_llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_theta=100000.0, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    run = tmp_path_factory.mktemp("bpe_run") / "run"
    train(TrainConfig(model=str(folder), exits=[2, 4], data="demo", rows="0:8", batch_size=4, max_length=256,
                      max_steps=1, lr=1e-3, output=str(run)), show_progress=False)
    from typer.testing import CliRunner

    from manyinone.cli.main import app

    result = CliRunner().invoke(app, ["eval", str(run), "--data", "demo", "--rows", "8:12", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    return run


IDS = None


def probe_ids(tokenizer) -> torch.Tensor:
    return tokenizer(TEXT, return_tensors="pt")["input_ids"]  # [1, seq]


def hf_logits(folder: Path, **kwargs) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()
    with torch.no_grad():
        return model(probe_ids(tok)).logits


def test_model_card_has_spec_cost_eval_table_and_training(bpe_run, tmp_path):
    out = export_budget(bpe_run, 0.6, tmp_path / "half")
    card = (out / "README.md").read_text()
    index = json.loads((out / "manyinone.json").read_text())
    [entry] = index["specs"]
    assert "# run: sub-model depth=2" in card and "library_name: transformers" in card
    assert f"| parameters | {entry['params']} |" in card
    assert f"{entry['relative_to_source']['flops']:.4g}" in card
    rows = json.loads((bpe_run / "eval.json").read_text())
    assert len(rows) == 2
    for r in rows:  # every budget of the run, with its loss
        assert f"{r['loss']:.4g}" in card and r["spec"] in card
    assert "**depth=2** (this export)" in card
    assert "lr: `0.001`" in card and "```yaml" in card and "max_steps: 1" in card
    listed = json.loads((out / "checksums.json").read_text())
    assert "README.md" in listed  # covered by the export's checksums like every other file
    every = export_all(bpe_run, tmp_path / "all")
    assert "| depth=2 |" in (every / "README.md").read_text() and "| depth=4 |" in (every / "README.md").read_text()


def test_gguf_of_a_budget_loads_back_with_equal_logits_and_tokens(bpe_run, tmp_path):
    from transformers import AutoTokenizer

    out = export_budget(bpe_run, 0.6, tmp_path / "half", gguf=True)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    want = hf_logits(out)
    got = hf_logits(out, gguf_file="model.gguf")
    assert got.shape == want.shape and float((got - want).abs().max()) < 1e-5
    hf_tok, gguf_tok = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")
    assert gguf_tok(TEXT)["input_ids"] == hf_tok(TEXT)["input_ids"]
    import gguf  # llama.cpp stops at the metadata's EOS id (transformers' GGUF tokenizer does not read it back)

    fields = gguf.GGUFReader(str(out / "model.gguf")).fields
    assert int(fields["tokenizer.ggml.eos_token_id"].parts[-1][0]) == hf_tok.eos_token_id
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "llama"
    assert "model.gguf" in json.loads((out / "checksums.json").read_text())


def test_gguf_for_every_budget(bpe_run, tmp_path):
    from transformers import AutoModelForCausalLM

    out = export_all(bpe_run, tmp_path / "all", gguf=True)
    nested = open_checkpoint(bpe_run)
    ids = probe_ids(nested.tokenizer)
    for entry in nested.index["specs"]:
        from manyinone.core.space import SubnetSpec

        spec = SubnetSpec(**entry["spec"])
        model = AutoModelForCausalLM.from_pretrained(out, gguf_file=gguf_name(entry["spec"]), dtype=torch.float32)
        assert model.config.num_hidden_layers == spec["depth"]
        with torch.no_grad():
            diff = (model.eval()(ids).logits - nested.sub_model(spec).eval()(ids).logits).abs().max()
        assert float(diff) < 1e-5, spec


def test_bfloat16_gguf(bpe_run, tmp_path):
    out = export_budget(bpe_run, 1.0, tmp_path / "bf16", dtype="bfloat16", gguf=True)
    want, got = hf_logits(out), hf_logits(out, gguf_file="model.gguf")
    assert float((got - want).abs().max()) < 1e-4  # the same bf16 values, read back as float32


def test_gguf_refuses_a_tokenizer_llama_cpp_cannot_read(trained_run, tmp_path):
    with pytest.raises(ManyinoneError, match="GGUF export needs a GPT-2 style BPE or a LLaMA"):
        export_budget(trained_run, 1.0, tmp_path / "char", gguf=True)
    assert not (tmp_path / "char").exists()  # nothing half-written


# --- the declared floor ---------------------------------------------------------------------------------
FLOOR_PYTHON = os.environ.get("MANYINONE_FLOOR_PYTHON")  # .ci/run sets it to a venv with transformers 4.56

PROBE = r"""
import json, sys, torch, transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
folder, text = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
ids = tok(text, return_tensors="pt")["input_ids"]
with torch.no_grad():
    logits = model(ids).logits
print(json.dumps({"version": transformers.__version__, "rope_theta": AutoConfig.from_pretrained(folder).rope_theta,
                  "architectures": model.config.architectures, "ids": ids[0].tolist(), "logits": logits[0].tolist()}))
"""


def test_config_carries_the_floors_spelling_of_rope(bpe_run, tmp_path):
    out = export_budget(bpe_run, 0.6, tmp_path / "half")
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == 100000.0  # 4.x reads this key; without it 4.56 silently used 10000
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"


@pytest.mark.skipif(not FLOOR_PYTHON, reason="MANYINONE_FLOOR_PYTHON (a python with transformers 4.56) not set")
def test_exports_load_the_same_under_the_transformers_floor(bpe_run, tmp_path):
    from transformers import AutoTokenizer

    for name, out in [("half", export_budget(bpe_run, 0.6, tmp_path / "half")),
                      ("bf16", export_budget(bpe_run, 1.0, tmp_path / "bf16", dtype="bfloat16"))]:
        done = subprocess.run([FLOOR_PYTHON, "-c", PROBE, str(out), TEXT], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": ""}, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        floor = json.loads(done.stdout.strip().splitlines()[-1])
        assert floor["version"].startswith("4.56"), floor["version"]
        assert floor["rope_theta"] == 100000.0 and floor["architectures"] == ["LlamaForCausalLM"]
        assert floor["ids"] == AutoTokenizer.from_pretrained(out)(TEXT)["input_ids"], name
        diff = (torch.tensor(floor["logits"]) - hf_logits(out)[0]).abs().max()
        assert float(diff) < 1e-4, (name, float(diff))
