"""`python -m manyinone ...` plus a TEST-ONLY pause inside checkpoint writes, so that a test can
SIGKILL the process in the middle of writing a checkpoint. Never used outside tests/reliability.

Environment:
    MANYINONE_TEST_PAUSE_AT   K: after the K-th checkpoint file this process writes (weights or
                              optimizer state, resumable or final), write MANYINONE_TEST_MARKER and
                              sleep, leaving the checkpoint half-written in its temp folder.
    MANYINONE_TEST_MARKER     file that receives the path of the file just written.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

import manyinone.io.checkpoint as checkpoint
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
            # Renamed into place: the test polls for the marker and kills at once, so it must never
            # see the file before its text is in it (a CI run caught it empty).
            staged = Path(MARKER).with_suffix(".partial")
            staged.write_text(str(path))
            staged.rename(MARKER)
            time.sleep(60)  # the test kills us here

    return write


if PAUSE_AT:
    state_module.save_model = pausing(state_module.save_model)  # resumable state: weights
    checkpoint.save_model = pausing(checkpoint.save_model)  # the final checkpoint's weights
    torch.save = pausing(torch.save)  # resumable state: optimizer (this process only)

if __name__ == "__main__":
    app(prog_name="manyinone")
