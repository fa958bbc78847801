"""The one error type users see: a one-line message naming the bad value and what is allowed.

The CLI turns it into `error: <message>` and exit code 2, never a traceback.
"""


class ManyinoneError(ValueError):
    """Bad input (model, axis, budget, data row, checkpoint) with a one-line, actionable message."""


def resource_error(exc: BaseException, doing: str) -> ManyinoneError | None:
    """The one-line error for running out of memory while `doing` something, or None if `exc` is another
    error. Loaders check this before any verdict on the user's files: an OOM is never "corrupt"."""
    names = {c.__name__ for c in type(exc).__mro__}  # torch.OutOfMemoryError, without importing torch here
    if isinstance(exc, MemoryError) or "OutOfMemoryError" in names or "out of memory" in str(exc).lower():
        return ManyinoneError(f"out of memory while {doing} ({type(exc).__name__}: {first_line(exc) if str(exc) else 'no detail'}); "
                              "free memory, or use a smaller dtype or another device")
    return None


def unreadable(what: str, path: object, exc: BaseException) -> ManyinoneError:
    """`<what> '<path>' ...` for a file that cannot be read: not found, a folder, or the OS's reason."""
    if isinstance(exc, IsADirectoryError):
        return ManyinoneError(f"{what} {str(path)!r} is a folder; expected a file")
    if isinstance(exc, FileNotFoundError):
        return ManyinoneError(f"{what} {str(path)!r} not found")
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
    return ManyinoneError(f"{what} {str(path)!r} unreadable ({reason})")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type name), for one-line errors."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
