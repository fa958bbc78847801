"""The one durable writer: every file and folder manyinone writes goes through here.

Guarantees, the same for every caller (checkpoints, exports, resume state, latency tables, tuned
settings): the new content is written beside the target, flushed to disk (fsync), then renamed over
the target in one step, and the rename itself is made durable (fsync of the parent folder). A crash
leaves the old content or the new one, never a mix; a failed write (disk full, unwritable folder)
raises `OutputWriteError` naming the target, with what was there before left intact.

Example:
    >>> write_text_durably(run / "latency.json", text)
    >>> with atomic_dir(run / "export", checksums=True) as tmp:
    ...     (tmp / "model.safetensors").write_bytes(...)      # renamed into place on success
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; a write in progress is then not told from a killed one
    fcntl = None

from manyinone.core.errors import ManyinoneError
from manyinone.io.integrity import CHECKSUMS_FILE, file_digest

# The budget index is moved into a merged folder last, so a reader never sees an index whose weights
# are not in place yet (the name is the checkpoint's; kept here so this module imports nothing else).
INDEX_LAST = "manyinone.json"


class OutputWriteError(ManyinoneError, OSError):
    """Writing an output failed (disk full, unwritable folder); what was there before is intact.

    Also an OSError, so callers catching I/O errors keep working.
    """


def fsync_file(path: Path) -> None:
    """Flush one written file to disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_file_durably(path: Path, write: Callable[[Path], None]) -> None:
    """Replace `path` by what `write(tmp)` writes to a temp file beside it: fsync, one rename, fsync of the folder."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def append_durably(f, text: str) -> None:
    """Append `text` to the open file `f` and flush it to disk: an append-only log (a resumable
    generated data set) whose every whole line survives a crash."""
    f.write(text)
    f.flush()
    os.fsync(f.fileno())


def truncate_durably(path: Path, size: int) -> None:
    """Cut `path` to `size` bytes (a line a kill left unfinished) and flush that to disk."""
    with open(path, "r+b") as f:
        f.truncate(size)
        os.fsync(f.fileno())


def publish_file(finished: Path, target: Path) -> None:
    """Rename a finished file (a completed log) to `target` in one step, made durable."""
    os.replace(finished, target)
    fsync_dir(target.parent)


def write_text_durably(path: Path, text: str) -> None:
    """Replace `path` with `text` in one rename, so a crash leaves the old or the new file, never half."""
    write_file_durably(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_checksums(folder: Path) -> dict[str, dict]:
    """List every file of `folder` (not sub-folders) in `folder/checksums.json`; returns the listing."""
    listing = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != CHECKSUMS_FILE:
            size, sha = file_digest(path, sync=True)
            listing[path.name] = {"bytes": size, "sha256": sha}
    write_text_durably(folder / CHECKSUMS_FILE, json.dumps(listing, indent=1) + "\n")
    return listing


def lock_folder(path: Path) -> int:
    """Hold an exclusive lock on folder `path` while writing it; released when the returned fd is closed
    or the process dies, so `in_use` tells a write in progress from one a kill left behind."""
    fd = os.open(path, os.O_RDONLY)
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def in_use(path: Path) -> bool:
    """True while a live process holds `path`'s lock (`lock_folder`)."""
    if fcntl is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False


def _write_id(tmp: Path) -> str:
    """The id shared by a write's temp folder `.NAME.tmp-ID` and its moved-aside `.NAME.old-ID`."""
    return tmp.name.rpartition(".tmp-")[2] if ".tmp-" in tmp.name else uuid.uuid4().hex[:8]


def publish_dir(tmp: Path, target: Path) -> None:
    """Put the finished folder `tmp` in place of `target` (old content moved aside first, then removed)."""
    if target.exists():
        old = target.parent / f".{target.name}.old-{_write_id(tmp)}"
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    fsync_dir(target.parent)


@contextmanager
def atomic_dir(target: str | os.PathLike, merge: bool = False, checksums: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `target`; on success it replaces `target` in one rename.

    With `merge`, files are instead renamed one by one into an existing `target` (a training run
    folder that also holds logs), the budget index last, so a reader never sees an index whose
    weights are not in place yet. On any error the temp folder is removed and `target` untouched;
    a failed write (disk full, unwritable folder) raises OutputWriteError naming `target`.
    With `checksums`, every file written is listed with its sha256 in `checksums.json` (`integrity`).
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        recover_interrupted_write(target)
        tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        held = lock_folder(tmp)  # tells readers' recovery that this write is alive
    except OSError as exc:
        raise write_failure(target, exc) from None
    try:
        yield tmp
        if checksums:
            write_checksums(tmp)  # sizes + sha256 of everything written, each file fsync'ed
        if merge:
            target.mkdir(exist_ok=True)
            for item in sorted(tmp.iterdir(), key=lambda p: p.name == INDEX_LAST):
                os.replace(item, target / item.name)
            tmp.rmdir()
            fsync_dir(target)
            fsync_dir(target.parent)
        else:
            publish_dir(tmp, target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(exc, ManyinoneError) and is_write_failure(exc):
            raise write_failure(target, exc) from None
        raise
    finally:
        os.close(held)


def recover_interrupted_write(target: Path) -> None:
    """Undo what a write of `target` killed mid-way (SIGKILL, power loss) left beside it.

    `.NAME.tmp-ID` is an unfinished write: removed. `.NAME.old-ID` is the previous content, moved
    aside by a write that died before its second rename: put back if `target` is gone, else removed.
    A write still running in another process (its temp folder locked) is left alone.
    """
    name = glob.escape(target.name)
    for stale in target.parent.glob(f".{name}.tmp-*"):
        if not in_use(stale):
            shutil.rmtree(stale, ignore_errors=True)
    for old in target.parent.glob(f".{name}.old-*"):
        writer = target.parent / f".{target.name}.tmp-{old.name.rpartition('.old-')[2]}"
        if in_use(writer):  # between a live write's two renames
            continue
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(old, target)
            except OSError:  # the live write's second rename came first
                if not target.exists():
                    raise


def is_write_failure(exc: BaseException) -> bool:
    """True for the errors a full disk or an unwritable folder raises through our writers.

    safetensors and torch.save wrap the OS error in their own types (SafetensorError "I/O error",
    RuntimeError from torch's zip writer), so the type alone does not tell.
    """
    if isinstance(exc, OSError):
        return True
    text = str(exc)
    return (type(exc).__name__ == "SafetensorError" and "I/O error" in text) or (
        isinstance(exc, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text))


def write_failure(target: Path, exc: BaseException) -> OutputWriteError:
    """A one-line error for a failed write of `target`, with the free space left where it goes."""
    if isinstance(exc, OSError) and exc.strerror:
        reason = exc.strerror
    else:  # safetensors: "... I/O error: No space left on device (os error 28)"; torch: "unexpected pos ..."
        found = re.search(r"I/O error: (.+?) \(os error", str(exc))
        reason = found.group(1) if found else "the write failed (disk full?)"
    try:
        free = f"; {shutil.disk_usage(target.parent).free / 2**20:,.1f} MiB free there"
    except OSError:
        free = ""
    return OutputWriteError(f"cannot write {str(target)!r}: {reason}{free}; what was there before is left intact")
