"""Nothing runs that shouldn't, nothing unverified loads (issue 11, items 6-7): a config asking for
custom code (`auto_map`) is refused before transformers sees it, a manyinone checkpoint must carry a
real checksums.json (every command, eval included), and a file the index names stays inside the folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import manyinone
from manyinone.cli import app
from manyinone.errors import ManyinoneError
from manyinone.integrity import CHECKSUMS_FILE, write_checksums

EVIL = "import pathlib\npathlib.Path({proof!r}).touch()\nfrom transformers import LlamaConfig\n\n\nclass EvilConfig(LlamaConfig):\n    model_type = 'evil'\n"


def invoke(*args, input=None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def error_line(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    return result.stderr.strip().splitlines()[-1]


def flip_byte(path: Path, at: float = 0.9) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x01
    path.write_bytes(bytes(data))


def plant_remote_code(folder: Path, proof: Path, file: str = "config.json") -> None:
    """What the hostile run did: auto_map + a .py beside it (and, in a checkpoint, checksums regenerated)."""
    config = json.loads((folder / file).read_text())
    if file == "config.json":
        config["model_type"] = "evil"  # a type transformers does not ship: it would ask to run evil.py
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilConfig",
                          "AutoTokenizer": ["evil.EvilConfig", None]}
    (folder / file).write_text(json.dumps(config))
    (folder / "evil.py").write_text(EVIL.format(proof=str(proof)))
    if (folder / CHECKSUMS_FILE).is_file():
        write_checksums(folder)


@pytest.fixture
def ckpt(trained_run, tmp_path) -> Path:
    return Path(shutil.copytree(trained_run, tmp_path / "ckpt"))


# --- 6. no code runs from a checkpoint or a model folder -------------------------------------------
@pytest.mark.parametrize("command", [("generate", "--prompt", "hi"), ("export", "--all", "-o", "OUT"),
                                     ("eval", "--data", "demo", "--rows", "0:4")])
@pytest.mark.parametrize("file", ["config.json", "tokenizer_config.json"])
def test_auto_map_in_a_checkpoint_is_refused_and_never_prompts(ckpt, tmp_path, command, file):
    proof = tmp_path / "code-ran"
    plant_remote_code(ckpt, proof, file)
    args = [a.replace("OUT", str(tmp_path / "out")) for a in command[1:]]
    line = error_line(invoke(command[0], ckpt, *args, input="y\n"))  # a user who would answer yes
    assert line == (f"error: model folder {str(ckpt)!r} asks to run code shipped with it ({file} has auto_map); "
                    "manyinone never runs code from a model folder: remove auto_map, or use a model type "
                    "transformers ships")
    assert not proof.exists()


def test_auto_map_in_a_base_model_is_refused(tiny_llama, tmp_path, monkeypatch):
    proof = tmp_path / "code-ran"
    base = Path(shutil.copytree(tiny_llama, tmp_path / "base"))
    plant_remote_code(base, proof)
    for args in (("train", "--model", base, "--output", tmp_path / "run", "--max-steps", "1", "--quiet"),
                 ("eval", base, "--exits", "2,4", "--data", "demo", "--rows", "0:4", "--output", tmp_path / "ev")):
        assert "asks to run code shipped with it (config.json has auto_map)" in error_line(invoke(*args, input="y\n"))
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("y\n"))
    with pytest.raises(ManyinoneError, match="asks to run code"):
        manyinone.load(base)
    assert not proof.exists() and not (tmp_path / "run").exists()


def test_every_transformers_load_passes_trust_remote_code_false(ckpt, tiny_llama, monkeypatch):
    """Even where no auto_map is visible beforehand (a hub name), transformers is told never to run code."""
    import transformers

    seen = []
    for cls in (transformers.AutoConfig, transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        real = cls.from_pretrained.__func__

        def spy(klass, *args, _real=real, _name=cls.__name__, **kwargs):
            seen.append((_name, kwargs.get("trust_remote_code")))
            return _real(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    from manyinone.loading import load_pretrained
    from manyinone.session import generate_text

    manyinone.load(ckpt)
    load_pretrained(str(tiny_llama))
    generate_text(ckpt, "hi", None, 2, 0.0, 1.0, None, 0)
    assert seen and all(flag is False for _, flag in seen), seen


# --- 7. verification cannot be turned off -----------------------------------------------------------
def test_eval_verifies_a_checkpoint_without_its_index_file(ckpt, tmp_path):
    flip_byte(ckpt / "model.safetensors")
    (ckpt / "manyinone.json").unlink()
    line = error_line(invoke("eval", ckpt, "--data", "demo", "--rows", "0:4", "--output", tmp_path / "ev"))
    assert line == f"error: checkpoint {str(ckpt)!r} is corrupt or incomplete: manyinone.json is missing"
    (ckpt / CHECKSUMS_FILE).unlink()  # the index still sits in the weights' metadata: still a manyinone checkpoint
    line = error_line(invoke("eval", ckpt, "--data", "demo", "--rows", "0:4", "--output", tmp_path / "ev"))
    assert line.startswith(f"error: checkpoint {str(ckpt)!r} is a manyinone checkpoint without {CHECKSUMS_FILE}")


@pytest.mark.parametrize("listing", [{}, "drop-weights"])
def test_an_empty_or_partial_listing_is_refused(ckpt, listing):
    if listing == "drop-weights":
        listing = {k: v for k, v in json.loads((ckpt / CHECKSUMS_FILE).read_text()).items() if k != "model.safetensors"}
    (ckpt / CHECKSUMS_FILE).write_text(json.dumps(listing))
    flip_byte(ckpt / "model.safetensors")
    with pytest.raises(ManyinoneError, match=f"checkpoint '{ckpt}' is corrupt or incomplete: "
                                             f"{CHECKSUMS_FILE} does not list model.safetensors"):
        manyinone.load(ckpt)


def test_a_checkpoint_without_checksums_is_refused_a_plain_model_is_fine(ckpt, tiny_llama):
    (ckpt / CHECKSUMS_FILE).unlink()
    with pytest.raises(ManyinoneError, match=f"is a manyinone checkpoint without {CHECKSUMS_FILE}"):
        manyinone.load(ckpt)
    from manyinone.loading import load_pretrained

    assert not (tiny_llama / CHECKSUMS_FILE).exists()
    load_pretrained(str(tiny_llama))  # a plain HF folder carries no listing: nothing to verify


@pytest.mark.parametrize("name", ["../outside.safetensors", "/tmp/abs.safetensors", "sub/../../x.safetensors"])
def test_an_index_path_outside_the_checkpoint_is_refused(tiny_llama, tmp_path, name):
    from manyinone.config import TrainConfig
    from manyinone.train import train

    run = train(TrainConfig(model=str(tiny_llama), exits=[2, 4], max_steps=1, batch_size=2, exit_heads="translator",
                            output=str(tmp_path / "run")), show_progress=False)
    shutil.copy(run / "exit_heads.safetensors", tmp_path / "outside.safetensors")
    index = json.loads((run / "manyinone.json").read_text())
    index["exit_heads"]["file"] = name
    (run / "manyinone.json").write_text(json.dumps(index))
    write_checksums(run)
    with pytest.raises(ManyinoneError) as err:
        manyinone.load(run, budget=0.6)
    assert str(err.value) == (f"checkpoint {str(run)!r} names exit heads file {name!r}, which is not a file "
                              "name inside the checkpoint")
