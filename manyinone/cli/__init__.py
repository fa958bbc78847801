"""The `manyinone` command line: thin typer commands over library functions."""

from manyinone.cli.main import app, main

__all__ = ["app", "main"]
