"""Checksums and durable writes for every folder manyinone writes (checkpoints, exports, resume state).

Each such folder carries `checksums.json`: `{file name: {"bytes": n, "sha256": hex}}` for every file
written with it, computed (and fsync'ed) before the folder is renamed into place. Readers verify it
before loading anything, so a truncated copy or an altered file is refused with an error naming the
file, never loaded silently.

Example:
    >>> write_checksums(folder)          # after the files are written, before the rename
    >>> verify_checksums(folder)         # raises ManyinoneError naming a missing/truncated/altered file
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; a write in progress is then not told from a killed one
    fcntl = None

from manyinone.errors import ManyinoneError

CHECKSUMS_FILE = "checksums.json"
COMMIT_DIR = ".manyinone.commit"  # files that replace_files_together has committed but not yet moved into place
_CHUNK = 1 << 20  # bytes read at a time while hashing


class OutputWriteError(ManyinoneError, OSError):
    """Writing an output failed (disk full, unwritable folder); what was there before is intact.

    Also an OSError, so callers catching I/O errors keep working.
    """


def file_digest(path: Path, sync: bool = False) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of `path`; with `sync`, also flush it to disk (fsync)."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        if sync:
            os.fsync(f.fileno())
    return size, digest.hexdigest()


def write_checksums(folder: Path) -> dict[str, dict]:
    """List every file of `folder` (not sub-folders) in `folder/checksums.json`; returns the listing."""
    listing = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != CHECKSUMS_FILE:
            size, sha = file_digest(path, sync=True)
            listing[path.name] = {"bytes": size, "sha256": sha}
    write_text_durably(folder / CHECKSUMS_FILE, json.dumps(listing, indent=1) + "\n")
    return listing


# Files some loader reads (weights, configs, tokenizers, code): in a listed folder each must be listed,
# so a partial listing (or `{}`) cannot switch verification off. Reports beside a checkpoint are not.
_LOADED_SUFFIXES = (".safetensors", ".pt", ".bin", ".gguf", ".py", ".json", ".model", ".tiktoken")
_REPORTS = ("eval.json",)


def verify_checksums(folder: str | os.PathLike, what: str = "checkpoint") -> bool:
    """Check every file listed in `folder/checksums.json`; True when all match.

    Raises ManyinoneError "<what> '<folder>' is corrupt or incomplete: <file> is ..." on the first
    missing, truncated or altered file, and when the listing is absent, empty, or leaves out a file
    that loaders read (weights, configs, tokenizer, code). Other files (logs, eval reports) are not checked.
    Whether a folder needs a listing at all is `checkpoint.verify_checkpoint`'s call (a plain HF one does not).
    """
    folder = Path(folder)
    listing_file = folder / CHECKSUMS_FILE
    if not listing_file.is_file():
        raise ManyinoneError(f"{what} {str(folder)!r} is a manyinone checkpoint without {CHECKSUMS_FILE}, so its "
                             "files cannot be verified; restore it, or re-list files you trust with "
                             "manyinone.integrity.write_checksums")
    broken = f"{what} {str(folder)!r} is corrupt or incomplete"
    try:
        listing = json.loads(listing_file.read_text(encoding="utf-8"))
        entries = [(str(name), int(e["bytes"]), str(e["sha256"])) for name, e in listing.items()]
    except (ValueError, TypeError, KeyError, AttributeError, OSError, RecursionError) as exc:
        raise ManyinoneError(f"{broken}: {CHECKSUMS_FILE} is unreadable ({type(exc).__name__})") from None
    names = {name for name, _, _ in entries}
    unlisted = sorted((p.name for p in folder.iterdir() if p.is_file() and p.name not in names
                       and p.suffix in _LOADED_SUFFIXES and p.name not in (CHECKSUMS_FILE, *_REPORTS)),
                      key=lambda name: (not name.endswith(".safetensors"), name))
    if unlisted or not entries:
        raise ManyinoneError(f"{broken}: {CHECKSUMS_FILE} does not list {unlisted[0] if unlisted else 'any file'}")
    for name, expected_size, expected_sha in entries:
        path = folder / name
        if Path(name).name != name or name in (".", ".."):  # a listing may only name files of this folder
            raise ManyinoneError(f"{broken}: {CHECKSUMS_FILE} lists {name!r}, which is not a file name")
        if not path.is_file():
            raise ManyinoneError(f"{broken}: {name} is missing")
        size = path.stat().st_size
        if size != expected_size:
            how = "truncated" if size < expected_size else "altered"
            raise ManyinoneError(f"{broken}: {name} is {how} ({size} bytes, {CHECKSUMS_FILE} records {expected_size})")
        if file_digest(path)[1] != expected_sha:
            raise ManyinoneError(f"{broken}: {name} is altered (its sha256 differs from {CHECKSUMS_FILE})")
    return True


def write_text_durably(path: Path, text: str) -> None:
    """Replace `path` with `text` in one rename, so a crash leaves the old or the new file, never half."""
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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


def replace_files_together(folder: Path, texts: dict[str, str]) -> None:
    """Replace files of `folder` (name -> new text) as one commit: a kill at any point leaves all of
    them old or, once a reader has run `finish_replace`, all of them new.

    The new files are written and fsync'ed in a staging folder; one rename turns it into the commit
    record `COMMIT_DIR`, the commit point; `finish_replace` then moves each file into place.
    """
    finish_replace(folder)
    staging = folder / f"{COMMIT_DIR}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    held = lock_folder(staging)
    try:
        for name, text in texts.items():
            with open(staging / name, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        fsync_dir(staging)
        os.replace(staging, folder / COMMIT_DIR)  # the commit point
        fsync_dir(folder)
        finish_replace(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        os.close(held)


def finish_replace(folder: Path) -> None:
    """Complete a commit of `replace_files_together` that a kill interrupted (idempotent), and drop
    the staging folder of one killed before its commit point. Every reader of a checkpoint runs it."""
    for stale in folder.glob(f"{COMMIT_DIR}.tmp-*"):
        if not in_use(stale):
            shutil.rmtree(stale, ignore_errors=True)
    journal = folder / COMMIT_DIR
    if not journal.is_dir():
        return
    for item in sorted(journal.iterdir()):
        try:
            os.replace(item, folder / item.name)
        except FileNotFoundError:  # another reader moved it first
            pass
    fsync_dir(folder)
    try:
        journal.rmdir()
    except OSError:
        pass
