"""SIGTERM (what schedulers send before killing) and Ctrl-C (SIGINT) save resumable state of the
last finished step before `manyinone train` exits; the same command then resumes from it, exactly."""

from __future__ import annotations

import re
import signal
import subprocess
import time

import pytest

from harness import (SETTINGS, assert_bitwise_equal, child_env, complete_steps, metrics_lines, metrics_steps, run_weights,
                     train_command)

STEPS = 12


@pytest.mark.parametrize("signum, exit_code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_saves_then_exits(tiny_llama, tmp_path, reference_weights, capsys, signum, exit_code):
    from manyinone.train.config import TrainConfig
    from manyinone.train.loop import train

    out = tmp_path / "run"
    # save_every=0: no periodic checkpoints, so the only resumable state is the one the signal saves.
    command = train_command(tiny_llama, out, STEPS, save_every=0)
    proc = subprocess.Popen(command, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while metrics_lines(out) < 3 and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == exit_code, stderr
    assert "Traceback" not in stderr
    stopped = re.search(r"interrupted: (\w+) received: stopped after step (\d+), resumable state saved in '(.+)'; "
                        r"run the same command again to resume", stderr)
    assert stopped, stderr
    step = int(stopped.group(2))
    assert stopped.group(1) == signum.name and 3 <= step < STEPS
    assert complete_steps(out) == [step] and stopped.group(3) == str(out / "checkpoints" / f"step-{step:07d}")
    assert metrics_steps(out) == list(range(1, step + 1))
    assert not (out / "model.safetensors").exists()  # no final checkpoint: the run is not finished

    # The same run again (in-process: no second start-up) resumes from that state.
    train(TrainConfig(model=str(tiny_llama), output=str(out), max_steps=STEPS, **{**SETTINGS, "save_every": 0}),
          show_progress=False)
    assert f"resuming from step {step}" in capsys.readouterr().err
    assert_bitwise_equal(run_weights(out), reference_weights(STEPS))
    assert metrics_steps(out) == list(range(1, STEPS + 1))
