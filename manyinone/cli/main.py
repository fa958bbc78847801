"""`manyinone` command line: thin typer commands over the library functions, one module per command
group (train, checkpoints, evaluate, serving) registered on the one app in `cli.app`."""

from __future__ import annotations

# Each module registers its commands on import; this order is the order `--help` lists them in.
from manyinone.cli import train  # noqa: F401  isort: skip
from manyinone.cli import checkpoints, evaluate, serving  # noqa: F401  isort: skip
from manyinone.cli.app import _int_list, app  # noqa: F401  (the names callers import from here)
from manyinone.cli.serving import serve  # noqa: F401


def main() -> None:  # pragma: no cover - `python -m manyinone`
    app()
