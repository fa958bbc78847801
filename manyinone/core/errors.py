"""The one error type users see: a one-line message naming the bad value and what is allowed.

The CLI turns it into `error: <message>` and exit code 2, never a traceback.
"""


class ManyinoneError(ValueError):
    """Bad input (model, axis, budget, data row, checkpoint) with a one-line, actionable message."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type name), for one-line errors."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
