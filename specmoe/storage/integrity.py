"""Checksums of what is read, and range checks of what is decoded.

Two ways to verify a file against the SHA-256 recorded when it was written:

- :func:`read_verified` reads the whole file, hashes exactly those bytes and returns them:
  what is parsed is what was checked. For small files read whole (routing shards, JSON).
- :class:`VerifiedFiles` hashes a large file once and records a *verified marker* keyed by the
  file's identity (size, inode, mtime and ctime in ns). Later opens whose identity matches
  skip the hash; any write to the file changes its mtime/ctime and so forces a new check.
  It does not catch a fault that changes the bytes without touching the inode (bit rot),
  which ``specmoe traces verify`` (a full hash, markers ignored) is for.

docs/guarantees.md gives the measured cost of each.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from specmoe.errors import CorruptDataError, StorageError, storage_error
from specmoe.storage import atomic

_BLOCK = 1 << 20


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while block := handle.read(_BLOCK):
                digest.update(block)
    except OSError as exc:
        raise storage_error(exc, path) from None
    return digest.hexdigest()


def file_identity(path: str | Path) -> list[int]:
    """What changes whenever a file's content is rewritten: size, inode, device, mtime, ctime.
    (ctime cannot be set back by a user, so restoring an old mtime does not hide a write.)"""
    st = os.stat(path)
    return [st.st_size, st.st_ino, st.st_dev, st.st_mtime_ns, st.st_ctime_ns]


def mismatch(path: str | Path, remedy: str, error: type[CorruptDataError] = CorruptDataError) -> CorruptDataError:
    return error(f"{path}: SHA-256 does not match the one recorded when it was written (corrupt); {remedy}")


def read_verified(
    path: str | Path,
    sha256: str,
    *,
    size: int | None = None,
    remedy: str,
    error: type[CorruptDataError] = CorruptDataError,
) -> bytes:
    """The bytes of ``path``, after checking their size and SHA-256."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise storage_error(exc, path) from None
    if size is not None and len(data) != size:
        raise error(f"{path}: {len(data)} bytes but {size} were written (truncated or replaced); {remedy}")
    if sha256_bytes(data) != sha256:
        raise mismatch(path, remedy, error)
    return data


class VerifiedFiles:
    """Verified markers of the files of one directory, kept in ``marker`` (JSON).

    The marker is a cache: unreadable or missing, it is treated as empty, and when it cannot be
    written (a read-only directory) the markers live for this process only. Concurrent
    readers may each rewrite it; a lost update only costs a hash later.
    """

    def __init__(self, marker: str | Path):
        self.marker = Path(marker)
        self._entries: dict[str, dict] = self._load()

    def _load(self) -> dict[str, dict]:
        try:
            entries = json.loads(self.marker.read_text())
        except (OSError, ValueError):
            return {}
        return entries if isinstance(entries, dict) else {}

    def is_current(self, path: str | Path, sha256: str) -> bool:
        """Whether ``path`` was verified (or written) with this checksum and has not changed since."""
        entry = self._entries.get(Path(path).name)
        try:
            return isinstance(entry, dict) and entry.get("sha256") == sha256 and entry.get("id") == file_identity(path)
        except OSError:
            return False

    def record(self, path: str | Path, sha256: str, *, save: bool = True) -> None:
        """Note that ``path`` now holds content with checksum ``sha256`` (just verified or written)."""
        self._entries[Path(path).name] = {"sha256": sha256, "id": file_identity(path)}
        if save:
            self.save()

    def save(self) -> None:
        merged = {**self._load(), **self._entries}  # keep what other readers recorded meanwhile
        try:
            atomic.write_json(self.marker, merged, indent=None)
        except StorageError:  # a read-only directory: the markers live in this process only
            pass

    def verify(
        self,
        path: str | Path,
        sha256: str,
        *,
        remedy: str,
        error: type[CorruptDataError] = CorruptDataError,
        force: bool = False,
    ) -> bool:
        """Check ``path`` against ``sha256`` unless its marker is current (``force``: always);
        returns whether it had to hash."""
        if not force and self.is_current(path, sha256):
            return False
        if sha256_file(path) != sha256:
            raise mismatch(path, remedy, error)
        self.record(path, sha256)
        return True


def check_range(
    values: np.ndarray,
    low: int,
    high: int,
    *,
    what: str,
    path: str | Path,
    remedy: str,
    error: type[CorruptDataError] = CorruptDataError,
) -> None:
    """Every value in ``[low, high)``, else one line naming the file and the first bad value."""
    if values.size == 0:
        return
    smallest, largest = values.min(), values.max()
    if smallest < low or largest >= high:
        bad = smallest if smallest < low else largest
        raise error(f"{path}: {what} {bad} outside [{low}, {high}) (corrupt); {remedy}")


def check_finite(
    values: np.ndarray,
    *,
    what: str,
    path: str | Path,
    remedy: str,
    error: type[CorruptDataError] = CorruptDataError,
) -> None:
    if values.size and not np.isfinite(values).all():
        raise error(f"{path}: {what} hold NaN or infinite values (corrupt); {remedy}")
