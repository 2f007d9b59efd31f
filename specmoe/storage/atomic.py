"""Write-then-rename: a kill leaves the old file or the new one, never half of one.

The new content goes to a temporary file beside the target (same file system, so the rename
is atomic), is fsynced, renamed over the target, and the directory is fsynced so the rename
itself survives a power cut. A temporary file is named ``.<target name>.tmp-<pid>``: hidden,
unique per process, and recognisable by :func:`remove_temporaries`, which the holder of a
directory's lock runs to clear what a killed writer left.

Errors of the operating system (disk full, permission denied) become one
:class:`~specmoe.errors.StorageError` line naming the target.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from specmoe.errors import os_errno, storage_error

_TEMPORARY = re.compile(r"\..+\.tmp-\d+")


def temporary_path(final: str | Path) -> Path:
    final = Path(final)
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(directory: str | Path) -> None:
    """Make a rename or a new file in ``directory`` durable (a no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def commit(tmp: str | Path, final: str | Path) -> None:
    """fsync ``tmp``, rename it over ``final``, fsync the directory."""
    try:
        fsync_file(tmp)
        os.replace(tmp, final)
        fsync_directory(Path(final).parent)
    except OSError as exc:
        raise storage_error(exc, final) from None


@contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """A temporary path for a writer that takes a file name (``pq.write_table``,
    ``safetensors.save_file``); committed over ``final`` when the block succeeds, removed
    when it fails."""
    final = Path(final)
    tmp = temporary_path(final)
    try:
        yield tmp
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, Exception) and os_errno(exc) is not None:  # safetensors reports disk full in its own type
            raise storage_error(exc, final) from None
        raise
    commit(tmp, final)


def write_bytes(final: str | Path, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def write_text(final: str | Path, text: str) -> None:
    write_bytes(final, text.encode("utf-8"))


def write_json(final: str | Path, value, *, indent: int | None = 2) -> None:
    write_text(final, json.dumps(value, indent=indent))


def is_temporary(name: str) -> bool:
    return bool(_TEMPORARY.fullmatch(name))


def remove_temporaries(directory: str | Path, *, recursive: bool = False) -> list[Path]:
    """Delete ``.*.tmp-<pid>`` files under ``directory``: what killed writers left. Call it
    only while holding the directory's lock, so that no live writer's file is taken."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    candidates = directory.rglob(".*.tmp-*") if recursive else directory.glob(".*.tmp-*")
    removed = []
    for path in candidates:
        if is_temporary(path.name) and (path.is_file() or path.is_symlink()):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
