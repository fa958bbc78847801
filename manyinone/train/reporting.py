"""Metrics to the trackers users already watch: TensorBoard and Weights & Biases (optional extras).

metrics.jsonl stays the record of a run (resume trims it, benchmarks read it); a tracker gets a copy
of each step's numbers from the main rank. Extras: `pip install 'manyinone[tensorboard]'` or
`pip install 'manyinone[wandb]'`.
"""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any

from manyinone.core.errors import ManyinoneError

TRACKERS = ("tensorboard", "wandb")
TENSORBOARD_DIR = "tensorboard"  # inside the run folder


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if isinstance(v, numbers.Real) and not isinstance(v, bool) and k != "step"}


class Reporter:
    """Sends each step's metrics to the chosen trackers; `log` and `close` are no-ops without any."""

    def __init__(self, trackers: list[str] | None, output: Path, config: dict[str, Any], start_step: int = 0) -> None:
        self.tensorboard = self.wandb = None
        trackers = list(dict.fromkeys(trackers or []))
        unknown = [t for t in trackers if t not in TRACKERS]
        if unknown:
            raise ManyinoneError(f"report_to {unknown[0]!r} unknown; allowed {list(TRACKERS)}")
        if "tensorboard" in trackers:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ManyinoneError("report_to tensorboard needs the tensorboard package: "
                                     "pip install 'manyinone[tensorboard]'") from None
            # purge_step: a resumed run drops the events a killed run logged past its last checkpoint
            self.tensorboard = SummaryWriter(str(output / TENSORBOARD_DIR), purge_step=start_step + 1 if start_step else None)
        if "wandb" in trackers:
            try:
                import wandb
            except ImportError:
                raise ManyinoneError("report_to wandb needs the wandb package: pip install 'manyinone[wandb]'") from None
            # One wandb run per run folder: a resumed run continues it (its id is the folder's name).
            self.wandb = wandb.init(project="manyinone", name=output.resolve().name, dir=str(output), config=config,
                                    id=_run_id(output), resume="allow")

    def log(self, record: dict[str, Any]) -> None:
        step, values = int(record["step"]), _scalars(record)
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def _run_id(output: Path) -> str:
    import hashlib

    return "manyinone-" + hashlib.sha256(str(output.resolve()).encode()).hexdigest()[:12]
