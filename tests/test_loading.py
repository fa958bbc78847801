"""Model names and loading: hub aliases, the offline/gated error, bf16 weights."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from manyinone.cli.main import app
from manyinone.core.errors import ManyinoneError
from manyinone.io.aliases import HUB_ALIASES
from manyinone.io.loading import load_config, load_pretrained, resolve_source


def test_aliases_map_to_hub_names():
    assert resolve_source("llama2-13b").folder == "meta-llama/Llama-2-13b-hf"
    assert resolve_source("LLaMA2-7B").folder == "meta-llama/Llama-2-7b-hf"
    assert resolve_source("llama3-8b").folder == "meta-llama/Meta-Llama-3-8B"
    assert all(name.count("/") == 1 for name in HUB_ALIASES.values())


def test_a_local_folder_named_like_an_alias_wins(tiny_llama, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(tiny_llama, tmp_path / "llama2-7b")
    monkeypatch.chdir(tmp_path)
    assert resolve_source("llama2-7b").folder == "llama2-7b"


def test_train_help_lists_the_aliases():
    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for alias in ("llama2-7b", "llama2-13b", "llama3-8b", "smollm2"):
        assert alias in result.output


def test_offline_hub_model_says_what_to_do(monkeypatch):
    """conftest sets HF_HUB_OFFLINE=1: the hub cannot be reached, as on a machine without network."""
    with pytest.raises(ManyinoneError) as err:
        load_config(resolve_source("llama2-13b"))
    message = str(err.value)
    assert "\n" not in message
    assert "'llama2-13b' (meta-llama/Llama-2-13b-hf)" in message
    for hint in ("--model /path/to/Llama-2-13b-hf", "HF_HUB_OFFLINE=1", "huggingface-cli login", "hf download"):
        assert hint in message


def test_offline_error_through_the_cli(tmp_path):
    result = CliRunner().invoke(app, ["train", "--model", "meta-llama/Llama-2-13b-hf", "--output", str(tmp_path / "r"),
                                      "--quiet"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "HF_HUB_OFFLINE=1" in lines[0] and "huggingface-cli login" in lines[0], result.output


def test_bf16_loading_keeps_every_parameter_bf16(any_tiny_model):
    model, _ = load_pretrained(str(any_tiny_model), dtype=torch.bfloat16)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert dtypes and set(dtypes.values()) == {torch.bfloat16}, dtypes
    assert not any(p.is_meta for p in model.parameters())  # low-memory init filled every tensor
