"""The typer app every command registers on, its console, and the argument checks the commands share.

Every bad input ends as `error: <one line>` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import typer
from rich.console import Console

from manyinone.core.errors import ManyinoneError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Train one LLM as many nested sub-models; export and serve any budget.")
console = Console()


def _friendly(fn: Callable) -> Callable:
    """Turn ManyinoneError into a one-line message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ManyinoneError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt as exc:  # training's graceful stop says where its state was saved
            typer.echo(f"interrupted: {exc}" if str(exc) else "interrupted", err=True)
            raise typer.Exit(getattr(exc, "exit_code", 130)) from None

    return wrapper


def _at_least(value: int, low: int, name: str) -> int:
    if value < low:
        raise ManyinoneError(f"{name} {value} out of range; allowed >= {low}")
    return value


def _in_range(value: int, low: int, high: int, name: str) -> int:
    if not low <= value <= high:
        raise ManyinoneError(f"{name} {value} out of range; allowed {low} to {high}")
    return value


def _int_list(text: Optional[str], name: str) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ManyinoneError(f"{name} {text!r} malformed; expected comma-separated integers, e.g. 6,12,18,24,30") from None


