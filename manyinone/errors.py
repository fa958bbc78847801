"""The one error type users see: a one-line message naming the bad value and what is allowed.

The CLI turns it into `error: <message>` and exit code 2, never a traceback.
"""


class ManyinoneError(ValueError):
    """Bad input (model, axis, budget, data row, checkpoint) with a one-line, actionable message."""
