"""Rich progress display for long work: steps, tokens/s and the latest per-exit losses."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    """A progress bar over optimizer steps; a no-op when disabled (tests, non-interactive use)."""

    def __init__(self, total: int, labels: list[str], enabled: bool = True, description: str = "train") -> None:
        self.enabled, self.labels = enabled, labels
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[speed]}"), TextColumn("{task.fields[losses]}"),
            TimeElapsedColumn(), TimeRemainingColumn(),
            console=Console(stderr=True), disable=not enabled,
        )
        self.task = self.progress.add_task(description, total=total, speed="", losses="")

    def __enter__(self) -> "TrainProgress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def advance_to(self, step: int) -> None:
        self.progress.update(self.task, completed=step)

    def update(self, step: int, record: dict[str, Any]) -> None:
        losses = " ".join(
            f"{label.split('=')[-1]}:{record[f'ce/{label}']:.2f}" for label in self.labels if f"ce/{label}" in record
        )
        speed = f"{record.get('tokens_per_s', 0):,.0f} tok/s"
        self.progress.update(self.task, completed=step, speed=speed, losses=losses)
