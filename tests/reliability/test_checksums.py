"""Checkpoints, exports and resume states carry checksums.json; a missing, truncated or altered file
is refused with an error naming it, and nothing loads through pickle (no code runs from a checkpoint)."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import manyinone
from manyinone.cli import app
from manyinone.config import TrainConfig
from manyinone.errors import ManyinoneError
from manyinone.export import export_all, export_budget
from manyinone.integrity import CHECKSUMS_FILE, file_digest, verify_checksums, write_checksums
from manyinone.train import train


@pytest.fixture
def ckpt(trained_run, tmp_path) -> Path:
    """A writable copy of the conftest's trained run (its final checkpoint and resume states)."""
    return Path(shutil.copytree(trained_run, tmp_path / "ckpt"))


def listed(folder: Path) -> dict:
    return json.loads((folder / CHECKSUMS_FILE).read_text())


def flip_byte(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x01
    path.write_bytes(bytes(data))


def test_every_written_folder_lists_every_file(trained_run, tmp_path):
    half, every = export_budget(trained_run, 0.6, tmp_path / "half"), export_all(trained_run, tmp_path / "all")
    state = trained_run / "checkpoints" / "step-0000004"
    for folder in (trained_run, half, every, state):
        files = listed(folder)
        assert "model.safetensors" in files
        assert verify_checksums(folder)
        for name, entry in files.items():
            assert file_digest(folder / name) == (entry["bytes"], entry["sha256"])
    assert {"optimizer.pt", "state.json"} <= listed(state).keys()
    # Everything an export writes is listed; only the run folder holds unlisted logs.
    assert set(listed(half)) == {p.name for p in half.iterdir()} - {CHECKSUMS_FILE}
    assert "metrics.jsonl" not in listed(trained_run)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json", "manyinone.json"])
@pytest.mark.parametrize("damage", ["truncated", "altered", "missing"])
def test_damaged_file_is_refused_naming_it(ckpt, name, damage):
    path = ckpt / name
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "altered":
        flip_byte(path, 0.9)  # same size; in the weights this lands in tensor data, which loads without complaint
    else:
        path.unlink()
    with pytest.raises(ManyinoneError) as err:
        manyinone.load(ckpt, budget=1.0)
    message = str(err.value)
    assert f"checkpoint '{ckpt}' is corrupt or incomplete: {name} is {damage}" in message, message


def test_a_flipped_weight_bit_would_load_silently_without_checksums(ckpt):
    """Why checksums: the same damage loads through plain transformers, with different weights; manyinone
    refuses the checkpoint, and refuses it too once its listing is removed (tests/reliability/test_integrity.py)."""
    from transformers import AutoModelForCausalLM

    before = {k: v.clone() for k, v in manyinone.load(ckpt).state_dict().items()}  # not views of the mmapped file
    flip_byte(ckpt / "model.safetensors", 0.9)
    with pytest.raises(ManyinoneError, match="model.safetensors is altered"):
        manyinone.load(ckpt)
    after = AutoModelForCausalLM.from_pretrained(str(ckpt)).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    (ckpt / CHECKSUMS_FILE).unlink()
    with pytest.raises(ManyinoneError, match="is a manyinone checkpoint without checksums.json"):
        manyinone.load(ckpt)


@pytest.mark.parametrize("listing", ["{not json", '{"model.safetensors": 3}', '{"../outside": {"bytes": 1, "sha256": "0"}}'])
def test_damaged_listing_is_refused(ckpt, listing):
    (ckpt / CHECKSUMS_FILE).write_text(listing)
    with pytest.raises(ManyinoneError, match=f"checkpoint '{ckpt}' is corrupt or incomplete: "):
        manyinone.load(ckpt)


@pytest.mark.parametrize("command", [("export", "--all"), ("generate", "--prompt", "hi"), ("eval", "--data", "demo")])
def test_cli_names_the_damaged_file(ckpt, tmp_path, command):
    flip_byte(ckpt / "model.safetensors", 0.9)
    args = [command[0], str(ckpt), *command[1:], *(["--output", str(tmp_path / "out")] if command[0] != "generate" else [])]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: checkpoint '{ckpt}' is corrupt or incomplete: model.safetensors is altered "
        f"(its sha256 differs from {CHECKSUMS_FILE})")
    assert not (tmp_path / "out").exists()


def test_damaged_resume_state_is_refused(ckpt, tiny_llama):
    state = ckpt / "checkpoints" / "step-0000004"
    flip_byte(state / "optimizer.pt", 0.9)
    cfg = TrainConfig(model=str(tiny_llama), exits=[2, 4], data="demo", max_steps=5, batch_size=4, lr=1e-3,
                      output=str(ckpt))
    with pytest.raises(ManyinoneError, match=rf"resume checkpoint '{state}' is corrupt or incomplete: optimizer.pt "
                                             r"is altered .*; delete it to resume from an earlier one"):
        train(cfg, show_progress=False)


class _Exploit:
    """A pickle that, if ever unpickled, creates a file: the proof that code ran."""

    def __init__(self, proof: Path) -> None:
        self.proof = proof

    def __reduce__(self):
        return (Path.touch, (self.proof,))


def test_pickle_planted_in_a_resume_state_never_runs(ckpt, tiny_llama, tmp_path):
    proof = tmp_path / "code-ran"
    state = ckpt / "checkpoints" / "step-0000004"
    torch.save({"state": {}, "param_groups": [], "x": _Exploit(proof)}, state / "optimizer.pt")
    write_checksums(state)  # a forger who also rewrites the listing
    cfg = TrainConfig(model=str(tiny_llama), exits=[2, 4], data="demo", max_steps=5, batch_size=4, lr=1e-3,
                      output=str(ckpt))
    with pytest.raises(ManyinoneError, match="resume checkpoint .* is corrupt"):
        train(cfg, show_progress=False)
    assert not proof.exists()


def test_pickle_weights_beside_a_checkpoint_are_never_loaded(ckpt, tmp_path):
    proof = tmp_path / "code-ran"
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps(_Exploit(proof)))
    write_checksums(ckpt)
    with pytest.raises(ManyinoneError, match="corrupt or incomplete"):
        manyinone.load(ckpt)
    assert not proof.exists()
