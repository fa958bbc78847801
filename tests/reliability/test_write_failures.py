"""A full disk or an unwritable output: one clear error naming the path, the previous checkpoint intact."""

from __future__ import annotations

import errno
import os
import re
import resource
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

import manyinone
import manyinone.io.checkpoint as checkpoint
from harness import SETTINGS, assert_bitwise_equal, child_env, leftovers, run_weights, train_command
from manyinone.io.durable import OutputWriteError, atomic_dir
from manyinone.cli import app
from manyinone.train.config import TrainConfig
from manyinone.io.export import export_budget
from manyinone.io.integrity import verify_checksums
from manyinone.train.loop import train


def state_bytes(run: Path) -> int:
    state = next((run / "checkpoints").iterdir())
    return sum(p.stat().st_size for p in state.iterdir())


@pytest.fixture
def tiny_disk(tmp_path):
    """A real small filesystem (tmpfs), mounted for the test: needs root; skipped otherwise."""
    mounted = tmp_path / "disk"
    mounted.mkdir()

    def mount(size: int) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mounted)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        return mounted

    yield mount
    subprocess.run(["umount", "-l", str(mounted)], capture_output=True)  # lazy: a test may still hold a file open


def test_disk_full_keeps_the_previous_checkpoint(tiny_llama, tmp_path, tiny_disk, reference_weights):
    probe = tmp_path / "probe"
    train(TrainConfig(model=str(tiny_llama), output=str(probe), max_steps=1, **SETTINGS), show_progress=False)
    disk = tiny_disk(int(state_bytes(probe) * 1.5))  # room for one resume state, not two
    run = disk / "run"
    cfg = TrainConfig(model=str(tiny_llama), output=str(run), max_steps=3, **SETTINGS)
    with pytest.raises(OutputWriteError) as err:
        train(cfg, show_progress=False)
    step1, step2 = run / "checkpoints" / "step-0000001", run / "checkpoints" / "step-0000002"
    # torch.save hides the OS error (ENOSPC) behind its own, so the reason may be the generic one.
    assert re.fullmatch(rf"cannot write '{re.escape(str(step2))}': (No space left on device|the write failed "
                        r"\(disk full\?\)); [\d.]+ MiB free there; what was there before is left intact", str(err.value))
    assert verify_checksums(step1, "resume checkpoint") and not step2.exists()
    assert leftovers(run) == []
    # With room again (the run moved to a bigger disk), the same run resumes and ends exactly.
    moved = Path(shutil.copytree(run, tmp_path / "moved"))
    train(cfg.model_copy(update={"output": str(moved)}), show_progress=False)
    assert_bitwise_equal(run_weights(moved), reference_weights(3))


def test_file_size_limit_through_the_cli(tiny_llama, tmp_path):
    """No root needed: RLIMIT_FSIZE makes every write past 900 kB fail (the optimizer state is ~1.2 MB)."""
    out = tmp_path / "run"

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write (EFBIG) instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (900_000, 900_000))

    done = subprocess.run(train_command(tiny_llama, out, 2), env=child_env(), capture_output=True, text=True,
                          preexec_fn=limit_file_size, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"error: cannot write '{out / 'checkpoints' / 'step-0000001'}': the write failed (disk full?);")
    assert not (out / "checkpoints").exists() or list((out / "checkpoints").iterdir()) == []
    assert leftovers(out) == []


def test_unwritable_output_fails_before_training(tiny_llama, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "run"
    result = CliRunner().invoke(app, ["train", "--model", str(tiny_llama), "--output", str(out), "--max-steps", "1",
                                      "--batch-size", "2", "--quiet"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: cannot write '{out}': Not a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders anyway")
def test_read_only_output_folder(tiny_llama, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    result = CliRunner().invoke(app, ["train", "--model", str(tiny_llama), "--output", str(locked / "run"),
                                      "--max-steps", "1", "--batch-size", "2", "--quiet"])
    assert result.exit_code == 2 and "Permission denied" in result.stderr


def test_failed_export_leaves_the_previous_export_intact(trained_run, tmp_path, monkeypatch):
    out = export_budget(trained_run, 1.0, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint, "save_model", disk_full)
    with pytest.raises(OutputWriteError, match=f"cannot write '{out}': No space left on device; .* MiB free there"):
        export_budget(trained_run, 0.6, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert manyinone.load(out).config.num_hidden_layers == 4


def test_a_write_killed_between_its_two_renames_is_undone(tmp_path):
    """atomic_dir moves the old folder aside, then the new one in; a kill between leaves `.X.old-*`."""
    target = tmp_path / "x"
    aside = tmp_path / ".x.old-deadbeef"
    aside.mkdir()
    (aside / "f").write_text("previous")
    (tmp_path / ".x.tmp-cafebabe").mkdir()  # the killed write's own, unfinished folder
    with pytest.raises(RuntimeError):
        with atomic_dir(target):
            raise RuntimeError("this write fails too")
    assert (target / "f").read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["x"]
