"""Nothing is lost: export never deletes what it does not own, tuned settings commit whole, one
training run per output folder, a run never writes over its base model, and a killed export is
recovered by whichever command next reads its target (issue 11, items 1-5)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import manyinone
from manyinone.checkpoint import INDEX_FILE, read_index
from manyinone.cli import app
from manyinone.config import TrainConfig
from manyinone.errors import ManyinoneError
from manyinone.export import export_budget
from manyinone.integrity import CHECKSUMS_FILE, verify_checksums
from manyinone.runtime.tune import store_choice
from manyinone.train import train


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def error_line(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    return result.stderr.strip().splitlines()[-1]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def ckpt(trained_run, tmp_path) -> Path:
    return Path(shutil.copytree(trained_run, tmp_path / "ckpt"))


# --- 1. export never deletes the source or foreign files ---------------------------------------
def test_export_into_a_folder_holding_the_source_is_refused(trained_run, tmp_path):
    parent = tmp_path / "P"
    source = Path(shutil.copytree(trained_run, parent / "run1"))
    (parent / "notes.txt").write_text("x")
    before = snapshot(parent)
    line = error_line(invoke("export", source, "--budget", "0.6", "-o", parent))
    assert line == f"error: --output {str(parent)!r} holds the checkpoint being exported; choose another folder"
    assert snapshot(parent) == before and [p.name for p in tmp_path.iterdir()] == ["P"]


def test_export_over_a_folder_with_foreign_files_is_refused(trained_run, tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    line = error_line(invoke("export", trained_run, "--budget", "0.6", "-o", target))
    assert line.startswith(f"error: --output {str(target)!r} holds files an export did not write (notes.txt)")
    assert (target / "notes.txt").read_text() == "keep me"
    # a training run folder (resume states, metrics) is not an export to replace either
    run = Path(shutil.copytree(trained_run, tmp_path / "run"))
    line = error_line(invoke("export", trained_run, "--budget", "0.6", "-o", run))
    assert "holds files an export did not write (checkpoints, metrics.jsonl" in line
    assert (run / "checkpoints").is_dir()


def test_export_replaces_its_own_earlier_export(trained_run, tmp_path):
    out = export_budget(trained_run, 1.0, tmp_path / "out")
    export_budget(trained_run, 0.6, out)
    assert manyinone.load(out).config.num_hidden_layers < 4
    (tmp_path / "empty").mkdir()
    export_budget(trained_run, 0.6, tmp_path / "empty")


def test_export_onto_a_file_is_refused(trained_run, tmp_path):
    target = tmp_path / "a-file"
    target.write_text("data")
    assert "is a file" in error_line(invoke("export", trained_run, "--all", "-o", target))
    assert target.read_text() == "data"


# --- 2. tune-speculative commits manyinone.json and checksums.json together ---------------------
def killed_at(rename: int, ckpt: Path) -> bool:
    """Run store_choice in a forked child that dies (os._exit, no cleanup) at its `rename`-th rename.
    True if the child reached that rename."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: count renames, die at the chosen one
        os.close(read)
        count = [0]
        real_replace, real_rename = os.replace, os.rename

        def dying(real):
            def call(src, dst, *a, **k):
                count[0] += 1
                if count[0] == rename:
                    os.write(write, b"k")
                    os._exit(9)
                return real(src, dst, *a, **k)
            return call

        os.replace, os.rename = dying(real_replace), dying(real_rename)
        try:
            store_choice(ckpt, {"depth": 4, "draft_depth": 2, "draft_tokens": rename})
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    reached = os.read(read, 1) == b"k"
    os.close(read)
    return reached


def test_store_choice_killed_at_any_rename_leaves_a_consistent_checkpoint(ckpt):
    old = read_index(ckpt)
    rename, outcomes = 1, []
    while killed_at(rename, ckpt):
        # Whatever the kill left, the next reader sees the old index or the new one, never a mix.
        nested = manyinone.api.open_checkpoint(ckpt)
        tuned = nested.index.get("runtime", {}).get("speculative")
        assert tuned is None or tuned["draft_tokens"] < rename + 1
        assert verify_checksums(ckpt)
        assert not [p.name for p in ckpt.iterdir() if ".tmp-" in p.name or p.name.startswith(".manyinone.commit")]
        outcomes.append(tuned is not None)
        rename += 1
    assert rename > 1 and read_index(ckpt)["runtime"]["speculative"]["draft_tokens"] == rename
    assert old.get("runtime") is None
    store_choice(ckpt, {"depth": 4, "draft_depth": 2, "draft_tokens": 5})  # and it can always be re-tuned
    assert verify_checksums(ckpt) and read_index(ckpt)["runtime"]["speculative"]["draft_tokens"] == 5


# --- 3. one training run per output folder -------------------------------------------------------
def test_a_second_train_on_the_same_output_fails_at_once_naming_the_first(tiny_llama, tmp_path):
    from manyinone.train import run_lock

    out = tmp_path / "run"
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the "first run": holds the folder until told to finish
        try:
            with run_lock(out):
                os.write(ready_w, b"1")
                os.read(done_r, 1)
        finally:
            os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"1"
        cfg = TrainConfig(model=str(tiny_llama), exits=[2, 4], max_steps=1, batch_size=2, output=str(out))
        with pytest.raises(ManyinoneError) as err:
            train(cfg, show_progress=False)
        assert str(err.value) == (f"output {str(out)!r} is in use by another manyinone train (PID {pid}); "
                                  "wait for it to end or choose another --output")
        assert not (out / "model.safetensors").exists()
    finally:
        os.write(done_w, b"1")
        os.waitpid(pid, 0)
    with run_lock(out):  # released when the first run ends
        pass


# --- 4. a run never writes over its base model or the current directory --------------------------
def test_train_output_equal_to_the_model_folder_is_refused(tiny_llama, tmp_path):
    base = Path(shutil.copytree(tiny_llama, tmp_path / "base"))
    before = snapshot(base)
    line = error_line(invoke("train", "--model", base, "--output", f"{base}/", "--max-steps", "1", "--quiet"))
    assert line == (f"error: --output '{base}/' is the folder of --model {str(base)!r}; training would overwrite "
                    "the base model; choose another --output")
    assert snapshot(base) == before


def test_train_empty_output_is_refused(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = error_line(invoke("train", "--model", tiny_llama, "--output", "", "--max-steps", "1", "--quiet"))
    assert "'output'" in line and "empty" in line
    assert list(tmp_path.iterdir()) == []


# --- 5. a killed export is recovered by the next command that reads its target --------------------
def test_a_killed_exports_leftovers_are_recovered_on_the_next_read(trained_run, tmp_path):
    out = export_budget(trained_run, 0.6, tmp_path / "out")
    # Killed between its two renames: the previous export moved aside, the new one still a temp folder.
    os.replace(out, tmp_path / ".out.old-1234abcd")
    (tmp_path / ".out.tmp-1234abcd").mkdir()
    (tmp_path / ".out.tmp-1234abcd" / "model.safetensors").write_bytes(b"half")
    assert read_index(out)["exported"]["budget"] == 0.6  # `info`, `generate`, `export` read through here
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # Killed before the first rename (target intact): the temp folder goes on any read.
    (tmp_path / ".out.tmp-99999999").mkdir()
    manyinone.load(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    result = invoke("eval", out, "--data", "demo", "--rows", "0:4", "--device", "cpu")
    assert result.exit_code == 0, result.output


def test_a_live_writers_temp_folder_is_left_alone(trained_run, tmp_path):
    """Recovery on read must not delete the temp folder of an export still running in another process."""
    from manyinone.checkpoint import atomic_dir

    out = export_budget(trained_run, 0.6, tmp_path / "out")
    with atomic_dir(out) as tmp:
        (tmp / "f").write_text("being written")
        read_index(out)
        assert tmp.is_dir()
        shutil.copy(out / INDEX_FILE, tmp / INDEX_FILE)
    assert (out / "f").is_file() and not (out / CHECKSUMS_FILE).exists()

