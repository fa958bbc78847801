"""Graceful stop of a training run: SIGTERM or Ctrl-C finishes the current optimizer step, saves
resumable state, then exits; a second signal stops at once (the last complete checkpoint remains).

Schedulers (Slurm, Kubernetes) send SIGTERM before they kill a job, so a preempted run loses no step.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """Raised once the state after the last finished step is saved; the CLI exits with `exit_code`."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class StopRequest:
    """Truthy once a stop signal arrived; the training loop checks it between optimizer steps."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    def interrupted(self, step: int, saved: Path) -> TrainingInterrupted:
        name = signal.Signals(self.signum).name
        return TrainingInterrupted(f"{name} received: stopped after step {step}, resumable state saved in "
                                   f"{str(saved)!r}; run the same command again to resume", self.signum)


@contextmanager
def deferred_stop_signals() -> Iterator[StopRequest]:
    """While inside, SIGINT/SIGTERM only set the yielded StopRequest (and restore the old handlers)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request  # Python lets only the main thread set signal handlers; nothing to defer here
        return
    # getsignal() gives None for a handler installed from C; SIG_DFL is the closest to put back.
    previous = {s: signal.getsignal(s) or signal.SIG_DFL for s in STOP_SIGNALS}

    def on_signal(signum: int, frame) -> None:
        request.signum = signum
        for s, handler in previous.items():  # a second signal acts at once
            signal.signal(s, handler)
        print(f"\n{signal.Signals(signum).name} received: finishing this step and saving it; "
              "send it again to stop at once", file=sys.stderr, flush=True)

    for s in STOP_SIGNALS:
        signal.signal(s, on_signal)
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
