"""Run `manyinone train` as a real subprocess and kill it: at random moments, or inside a checkpoint
write (through killable_train.py's test-only pause). Used by test_kill_resume.py.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

KILLABLE = Path(__file__).with_name("killable_train.py")
RESUMED = re.compile(r"resuming from step (\d+)")

# Small and fast: a step takes ~40 ms on one CPU thread, so process start-up (~6 s) dominates.
SETTINGS = dict(exits=[2, 4], data="demo", batch_size=2, lr=1e-3, max_length=200, save_every=1, keep_checkpoints=2)


def train_command(model: Path, output: Path, steps: int, **overrides) -> list[str]:
    s = {**SETTINGS, **overrides}
    return [sys.executable, str(KILLABLE), "train", "--model", str(model), "--output", str(output),
            "--max-steps", str(steps), "--exits", ",".join(map(str, s["exits"])), "--data", s["data"],
            "--batch-size", str(s["batch_size"]), "--lr", str(s["lr"]), "--quiet",
            "--set", f"max_length={s['max_length']}", "--set", f"save_every={s['save_every']}",
            "--set", f"keep_checkpoints={s['keep_checkpoints']}"]


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MANYINONE_TEST_")}
    return {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def complete_steps(output: Path) -> list[int]:
    """Steps of the resumable checkpoints a resume may use (renamed into place, state.json inside)."""
    root = output / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name.split("-")[1]) for p in root.glob("step-*") if (p / "state.json").is_file())


def metrics_lines(output: Path) -> int:
    try:
        return len((output / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def leftovers(output: Path) -> list[str]:
    """Temp folders/files of unfinished writes anywhere in or beside the run folder."""
    places = [output.parent, output, output / "checkpoints"]
    return sorted(str(p) for place in places if place.is_dir() for p in place.iterdir() if ".tmp-" in p.name)


@dataclass
class KillReport:
    kills: list[dict] = field(default_factory=list)  # one per SIGKILL: how, at which step, what was on disk
    resumes: list[tuple[int, int]] = field(default_factory=list)  # (expected start, actual start) per restart

    @property
    def matched(self) -> int:
        return sum(expected == actual for expected, actual in self.resumes)


def _resumed_step(stderr: str) -> int:
    found = RESUMED.findall(stderr)
    return int(found[0]) if found else 0


def _wait(predicate, proc: subprocess.Popen, timeout: float = 120.0, poll: float = 0.005) -> bool:
    """Poll until `predicate()`; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return predicate()
        time.sleep(poll)
    raise TimeoutError("the training process neither reached the kill point nor ended")


def kill_and_resume(model: Path, output: Path, steps: int, kills: int, seed: int, log: Path) -> KillReport:
    """SIGKILL `kills` times (a third of them, and the last, inside a checkpoint write), restarting the
    same command after each; then let the last restart finish. Returns what happened at each kill and restart."""
    rng = random.Random(seed)
    report = KillReport()
    expected_start = 0
    attempt = 0
    while len(report.kills) < kills:
        attempt += 1
        if attempt > 4 * kills:
            raise RuntimeError(f"only {len(report.kills)} of {kills} kills landed")
        start = max(complete_steps(output), default=0)
        # Every third kill lands inside a checkpoint write; so does any kill near the end, where a
        # random moment could fall after the run has finished.
        # The last kill always lands in the final checkpoint's write.
        last = len(report.kills) == kills - 1
        in_save = len(report.kills) % 3 == 2 or start >= steps - 3 or last
        marker = log / f"marker-{attempt}"
        extra = {}
        if in_save:
            # Checkpoint file writes of this process: weights + optimizer per step left, then the
            # final checkpoint's weights and the final resumable state's two files.
            # Pause within the next three saves (weights or optimizer file), so kills spread over the run.
            writes = 2 * max(steps - 1 - start, 0) + 3
            pause_at = writes - 2 if last else min(writes, 2 * rng.randint(0, 2) + rng.randint(1, 2))
            extra = {"MANYINONE_TEST_PAUSE_AT": str(pause_at), "MANYINONE_TEST_MARKER": str(marker)}
        stderr_path = log / f"stderr-{attempt}.txt"
        metrics = output / "metrics.jsonl"
        stale = metrics.stat().st_ino if metrics.is_file() else None  # the killed run's file, with its tail

        def fresh_lines() -> int:  # lines written by this process (a resume rewrites the file first)
            if not metrics.is_file() or metrics.stat().st_ino == stale:
                return -1
            return metrics_lines(output)

        with open(stderr_path, "w") as err:
            proc = subprocess.Popen(train_command(model, output, steps), env=child_env(**extra),
                                    stdout=subprocess.DEVNULL, stderr=err)
            try:
                if in_save:
                    reached = _wait(marker.exists, proc)
                else:
                    target = min(start + rng.randint(1, 3), steps - 2)
                    reached = _wait(lambda: fresh_lines() >= target, proc)
                    time.sleep(rng.uniform(0, 0.06))  # anywhere within the next step or its save
                alive = proc.poll() is None
                proc.send_signal(signal.SIGKILL)
            finally:
                proc.kill()
                proc.wait()
        stderr = stderr_path.read_text()
        report.resumes.append((expected_start, _resumed_step(stderr)))
        if not (reached and alive):  # it finished before the kill point: nothing was killed
            raise RuntimeError(f"run ended before its kill point (rc={proc.returncode}): {stderr[-2000:]}")
        report.kills.append({"how": "in-save" if in_save else "random", "metrics_lines": metrics_lines(output),
                             "complete": complete_steps(output), "leftovers": leftovers(output),
                             "file": marker.read_text() if in_save else None})
        expected_start = max(complete_steps(output), default=0)
    # The last restart runs to the end.
    done = subprocess.run(train_command(model, output, steps), env=child_env(), capture_output=True, text=True,
                          timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"final resume failed (rc={done.returncode}): {done.stderr[-3000:]}")
    report.resumes.append((expected_start, _resumed_step(done.stderr)))
    return report


def run_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def metrics_steps(output: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()]
