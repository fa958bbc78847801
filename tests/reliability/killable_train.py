"""`python -m manyinone ...` plus a TEST-ONLY pause inside checkpoint writes, so that a test can
SIGKILL the process in the middle of writing a checkpoint. Never used outside tests/reliability.

Environment:
    MANYINONE_TEST_PAUSE_AT   K: after the K-th checkpoint file this process writes (weights or
                              optimizer state, resumable or final), write MANYINONE_TEST_MARKER and
                              sleep, leaving the checkpoint half-written in its temp folder.
    MANYINONE_TEST_MARKER     file that receives the path of the file just written.
    MANYINONE_TEST_PAUSE_DCP  K: under torchrun, the rank named by MANYINONE_TEST_PAUSE_RANK pauses
                              likewise after its K-th torch distributed checkpoint save has written
                              its shards (the folder not yet published); the marker gets its pid.
    MANYINONE_TEST_PID_DIR    under torchrun, each rank writes its pid to rank-R there on start.
    MANYINONE_TEST_SIGTERM_AT K: under torchrun, rank 1 sends itself SIGTERM just after the K-th step's
                              reduction over ranks: the moment where only that rank knows of the stop.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch

import manyinone.io.checkpoint as checkpoint
from manyinone.io.durable import write_text_durably
import manyinone.train.state as state_module
from manyinone.cli import app

torch.set_num_threads(1)  # the same reduction order as the in-process reference run (tests/conftest.py)

PAUSE_AT = int(os.environ.get("MANYINONE_TEST_PAUSE_AT", "0"))
MARKER = os.environ.get("MANYINONE_TEST_MARKER")
written = 0


def pausing(real):
    def write(obj, path, *args, **kwargs):
        global written
        real(obj, path, *args, **kwargs)
        written += 1
        if written == PAUSE_AT and MARKER:
            write_text_durably(Path(MARKER), str(path))  # in one rename: a CI run once read it empty
            time.sleep(60)  # the test kills us here

    return write


def pausing_dcp(real):
    saves = 0

    def save(*args, **kwargs):
        nonlocal saves
        result = real(*args, **kwargs)
        saves += 1
        if saves == PAUSE_DCP and os.environ.get("RANK") == os.environ.get("MANYINONE_TEST_PAUSE_RANK", "1"):
            write_text_durably(Path(MARKER), str(os.getpid()))
            time.sleep(120)  # the test kills this rank here; the others wait at the barrier after the save
        return result

    return save


PAUSE_DCP = int(os.environ.get("MANYINONE_TEST_PAUSE_DCP", "0"))
if PAUSE_DCP:
    import torch.distributed.checkpoint as dcp

    dcp.save = pausing_dcp(dcp.save)
SIGTERM_AT = int(os.environ.get("MANYINONE_TEST_SIGTERM_AT", "0"))
if SIGTERM_AT and os.environ.get("RANK") == "1":
    from manyinone.train.distributed import Runtime

    real_total, steps = Runtime.total, [0]

    def total_then_signal(self, value):  # the last reduction of each step (after its metrics' mean)
        result = real_total(self, value)
        steps[0] += 1
        if steps[0] == SIGTERM_AT:
            os.kill(os.getpid(), signal.SIGTERM)  # handled at the next bytecode: after the reduction
        return result

    Runtime.total = total_then_signal
if os.environ.get("MANYINONE_TEST_PID_DIR") and "RANK" in os.environ:
    write_text_durably(Path(os.environ["MANYINONE_TEST_PID_DIR"]) / f"rank-{os.environ['RANK']}", str(os.getpid()))

if PAUSE_AT:
    state_module.save_model = pausing(state_module.save_model)  # resumable state: weights
    checkpoint.save_model = pausing(checkpoint.save_model)  # the final checkpoint's weights
    torch.save = pausing(torch.save)  # resumable state: optimizer (this process only)

if __name__ == "__main__":
    app(prog_name="manyinone")
