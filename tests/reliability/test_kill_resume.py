"""SIGKILL `manyinone train` at random points, including inside checkpoint writes, and restart it:
every restart resumes from the newest complete checkpoint and the final weights equal, bit for bit,
those of a run never interrupted. CI runs 4 kills; `-m slow` runs the 24-kill version."""

from __future__ import annotations

import json
import os

import pytest

import manyinone
from harness import assert_bitwise_equal, kill_and_resume, leftovers, metrics_steps, run_weights
from manyinone.io.integrity import verify_checksums


def check_kill_chain(model, tmp_path, reference_weights, steps: int, kills: int, seed: int) -> dict:
    out, log = tmp_path / "run", tmp_path / "log"
    log.mkdir()
    report = kill_and_resume(model, out, steps, kills, seed, log)

    in_save = [k for k in report.kills if k["how"] == "in-save"]
    assert len(report.kills) == kills and len(in_save) >= kills // 3
    assert all(k["leftovers"] for k in in_save), in_save  # killed mid-write: a temp folder was left
    assert f"/.{out.name}.tmp-" in report.kills[-1]["file"]  # the last one inside the final checkpoint's write
    assert report.resumes == [(expected, expected) for expected, _ in report.resumes]
    assert_bitwise_equal(run_weights(out), reference_weights(steps))
    assert metrics_steps(out) == list(range(1, steps + 1))  # one line per step, no duplicate tail
    assert leftovers(out) == []  # the restarts cleaned every unfinished write
    assert verify_checksums(out) and verify_checksums(out / "checkpoints" / f"step-{steps:07d}", "resume checkpoint")
    assert manyinone.load(out, budget=0.6).manyinone_spec.label == "depth=2"

    figures = {"steps": steps, "kill_points": len(report.kills), "in_checkpoint_write": len(in_save),
               "resumes": len(report.resumes), "resumes_matched": report.matched, "final_weights_bitwise_equal": True,
               "kills": report.kills}
    if os.environ.get("MANYINONE_RELIABILITY_REPORT"):  # figures for docs/reliability.md
        with open(os.environ["MANYINONE_RELIABILITY_REPORT"], "a") as f:
            f.write(json.dumps(figures) + "\n")
    return figures


def test_kill_and_resume_short(tiny_llama, tmp_path, reference_weights):
    check_kill_chain(tiny_llama, tmp_path, reference_weights, steps=12, kills=4, seed=1)


@pytest.mark.slow
def test_kill_and_resume_long(tiny_llama, tmp_path, reference_weights, request):
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("the 24-kill version runs with -m slow")
    check_kill_chain(tiny_llama, tmp_path, reference_weights, steps=48, kills=24, seed=2)
