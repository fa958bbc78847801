"""Checksums for every folder manyinone writes (checkpoints, exports, resume state): hashing and
verifying here; `durable.write_checksums` writes the listing.

Each such folder carries `checksums.json`: `{file name: {"bytes": n, "sha256": hex}}` for every file
written with it, computed (and fsync'ed) before the folder is renamed into place. Readers verify it
before loading anything, at one of two depths:

- fast (every open: `manyinone.load`, the runtime, serve, eval, a teacher): every listed file is
  present with its recorded size, no loaded file is unlisted, and every file up to FAST_HASH_BYTES
  (configs, tokenizer, budget index, exit heads of small models) matches its sha256. A truncated,
  missing or extended file, or any altered small file, is refused. Weight files above the limit are
  checked by size only: hashing 26 GB would take a minute per open.
- full (export, resume, `manyinone verify`, `rewrite_index`): the sha256 of every byte, so a flipped
  bit anywhere is refused before it is copied into an export or trained on.

Example:
    >>> durable.write_checksums(folder)  # after the files are written, before the rename
    >>> verify_checksums(folder)         # raises ManyinoneError naming a missing/truncated/altered file
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from manyinone.core.errors import ManyinoneError

CHECKSUMS_FILE = "checksums.json"
_CHUNK = 1 << 20  # bytes read at a time while hashing
# Largest file a fast check still hashes: all but the weights; hashing runs at ~0.4 GB/s.
FAST_HASH_BYTES = 64 << 20


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


# Files some loader reads (weights, configs, tokenizers, code): in a listed folder each must be listed,
# so a partial listing (or `{}`) cannot switch verification off. Reports beside a checkpoint are not.
_LOADED_SUFFIXES = (".safetensors", ".pt", ".bin", ".gguf", ".py", ".json", ".model", ".tiktoken")
_REPORTS = ("eval.json",)


def verify_checksums(folder: str | os.PathLike, what: str = "checkpoint", full: bool = True) -> bool:
    """Check every file listed in `folder/checksums.json`; True when all match. `full=False` is the
    fast check of every open (sizes of all files, sha256 of those up to FAST_HASH_BYTES).

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
                             "manyinone.io.durable.write_checksums")
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
        if (full or size <= FAST_HASH_BYTES) and file_digest(path)[1] != expected_sha:
            raise ManyinoneError(f"{broken}: {name} is altered (its sha256 differs from {CHECKSUMS_FILE})")
    return True
