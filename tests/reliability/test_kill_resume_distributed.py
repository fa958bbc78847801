"""SIGKILL one rank of a 2-process `torchrun ... manyinone train` (gloo, CPU): once mid-step and once
inside a torch distributed checkpoint save, after its shards are written and before the folder is
published. Each restart resumes from the newest complete checkpoint, and the final weights equal,
bit for bit, those of a 2-process run never interrupted."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from harness import KILLABLE, _wait, assert_bitwise_equal, child_env, complete_steps, leftovers, metrics_lines, \
    metrics_steps, run_weights, train_command
from manyinone.io.integrity import verify_checksums

STEPS = 6


def torchrun(model, output, save_every: int = 1, **env) -> subprocess.Popen:
    command = train_command(model, output, STEPS, save_every=save_every)
    assert command[1] == str(KILLABLE)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *command[1:],
              "--set", "device=cpu"]
    output.parent.mkdir(parents=True, exist_ok=True)
    env.setdefault("MANYINONE_TEST_PID_DIR", tempfile.mkdtemp(prefix="pids-", dir=output.parent))
    proc = subprocess.Popen(launch, env=child_env(**env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    proc.pid_dir = Path(env["MANYINONE_TEST_PID_DIR"])  # each rank's pid lands there: `finish` may need them
    return proc


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    """Wait for the job; its stderr. A job still running at `timeout` (ranks waiting on each other)
    is killed, torchrun and each rank (torchrun starts them in sessions of their own), so that a
    failing test leaves no process behind and no pipe open."""
    try:
        return proc.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        for pid_file in proc.pid_dir.glob("rank-*"):
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        proc.communicate()
        raise


def wait_for(predicate, proc: subprocess.Popen) -> None:
    if not _wait(predicate, proc):
        raise RuntimeError(f"the run ended before its kill point (rc={proc.returncode}): {proc.stderr.read()[-2000:]}")


def kill_rank(pid_file, proc: subprocess.Popen) -> str:
    """SIGKILL the rank whose pid is in `pid_file`; torchrun then ends the other. Returns its stderr."""
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    stderr = finish(proc, 120)
    assert proc.returncode != 0  # torchrun reports the lost rank
    return stderr


pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")


@pytest.fixture(scope="module")
def reference(tiny_llama, tmp_path_factory):
    """Final weights of a 2-process run never interrupted."""
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = torchrun(tiny_llama, out)
    stderr = finish(proc)
    assert proc.returncode == 0, stderr[-3000:]
    return run_weights(out)


def test_killing_one_rank_mid_step_and_inside_a_dcp_save_then_resuming_is_bitwise_exact(tiny_llama, tmp_path,
                                                                                         reference):
    rng = random.Random(3)

    out = tmp_path / "run"
    expected, kills = [], []
    # 1. Mid-step: a random rank, at a random moment after the second step's metrics line.
    pids = tmp_path / "pids-1"
    pids.mkdir()
    proc = torchrun(tiny_llama, out, MANYINONE_TEST_PID_DIR=str(pids))
    wait_for(lambda: metrics_lines(out) >= 2 and (pids / "rank-1").is_file(), proc)
    time.sleep(rng.uniform(0, 0.06))
    rank = rng.choice([0, 1])
    kill_rank(pids / f"rank-{rank}", proc)
    kills.append(("mid-step", rank, complete_steps(out)))
    expected.append(max(complete_steps(out), default=0))

    # 2. Inside the save after the next step: rank 1 has written its shards; nothing is published.
    marker = tmp_path / "marker"
    proc = torchrun(tiny_llama, out, MANYINONE_TEST_PAUSE_DCP="1", MANYINONE_TEST_PAUSE_RANK="1",
                    MANYINONE_TEST_MARKER=str(marker))
    wait_for(marker.exists, proc)
    left = leftovers(out)
    stderr = kill_rank(marker, proc)
    assert f"resuming from step {expected[-1]}" in stderr
    assert any(p.endswith(".tmp-dcp") for p in left), left  # killed mid-save: its temp folder was there
    kills.append(("in-dcp-save", 1, complete_steps(out)))
    assert complete_steps(out)[-1] == expected[-1]  # the save that was cut did not become a checkpoint
    expected.append(expected[-1])

    # 3. The last restart runs to the end.
    proc = torchrun(tiny_llama, out)
    stderr = finish(proc)
    assert proc.returncode == 0, stderr[-3000:]
    assert f"resuming from step {expected[-1]}" in stderr

    assert 0 < expected[0] < STEPS, kills
    assert_bitwise_equal(run_weights(out), reference)
    assert metrics_steps(out) == list(range(1, STEPS + 1))  # one line per step, no duplicate tail
    assert leftovers(out) == []  # the restarts cleaned every unfinished save
    assert verify_checksums(out) and verify_checksums(out / "checkpoints" / f"step-{STEPS:07d}", "resume checkpoint")


def test_sigterm_to_one_rank_stops_both_at_the_same_step(tiny_llama, tmp_path, reference):
    """A scheduler's SIGTERM may reach one rank only, and at the worst moment: just after the step's
    reduction over ranks, so that only that rank knows. The ranks agree at the next step's reduction,
    both save that step and exit, and the resumed run ends bitwise equal to one never stopped."""
    out = tmp_path / "run"
    # No periodic saves: a rank that stopped alone would save alone, and the other would go on.
    proc = torchrun(tiny_llama, out, save_every=STEPS, MANYINONE_TEST_SIGTERM_AT="2")
    stderr = finish(proc, 120)
    assert proc.returncode != 0 and "interrupted" in stderr.lower(), stderr[-3000:]
    assert complete_steps(out) == [3] and metrics_steps(out) == [1, 2, 3]  # the step after the signal, saved
    assert verify_checksums(out / "checkpoints" / "step-0000003", "resume checkpoint")  # both ranks' shards

    proc = torchrun(tiny_llama, out)
    stderr = finish(proc)
    assert proc.returncode == 0 and "resuming from step 3" in stderr, stderr[-3000:]
    assert_bitwise_equal(run_weights(out), reference)
