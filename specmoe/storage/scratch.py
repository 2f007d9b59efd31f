"""The project's temporary directory: one place, cleaned on exit, on Ctrl-C, after a kill.

Temporary data goes to ``$SPECMOE_TMPDIR`` (default ``<system temp>/specmoe-<uid>``), one
subdirectory per use: ``with scratch_dir("serve") as tmp: ...``. The subdirectory is removed
when the block ends, normally or by an exception (Ctrl-C is one; the CLI turns SIGTERM into
one too). Its owner holds an ``flock`` on ``<subdirectory>/.owner`` while it lives, so after a
SIGKILL or a power cut the next start finds the lock free and removes the leftover
(:func:`sweep_stale`, run by every ``specmoe`` command as it starts).

A caller that needs its temporary files on a particular file system (a copy that must be
renamed into place, a disk under test) passes ``root=`` a directory there; the same rules hold.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from specmoe.errors import storage_error
from specmoe.storage.paths import check_name

SCRATCH_ENV = "SPECMOE_TMPDIR"
OWNER_FILE = ".owner"
ORPHAN_AGE_S = 600
"""A subdirectory without an owner file (killed between mkdir and lock) older than this is removed."""
YOUNG_S = 30
"""A subdirectory younger than this is never swept: its owner may be between creating the
owner file and locking it."""


def scratch_root() -> Path:
    """Where the project's temporary directories live."""
    configured = os.environ.get(SCRATCH_ENV)
    return Path(configured) if configured else Path(tempfile.gettempdir()) / f"specmoe-{os.getuid()}"


def _owner_is_gone(directory: Path) -> bool:
    owner = directory / OWNER_FILE
    try:
        age = time.time() - directory.stat().st_mtime
    except OSError:
        return False
    if age < YOUNG_S:
        return False
    if not owner.exists():
        return age > ORPHAN_AGE_S
    try:
        fd = os.open(owner, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:  # held: its owner is alive
        return False
    finally:
        os.close(fd)


def sweep_stale(root: str | Path | None = None) -> list[Path]:
    """Remove the subdirectories of ``root`` whose owners are no longer running."""
    root = Path(root) if root is not None else scratch_root()
    removed = []
    try:
        children = [p for p in root.iterdir() if p.is_dir() and not p.is_symlink()]
    except OSError:
        return removed
    for child in children:
        if _owner_is_gone(child):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed


@contextmanager
def scratch_dir(purpose: str, *, root: str | Path | None = None) -> Iterator[Path]:
    """A fresh private directory for ``purpose`` (a safe name, e.g. ``"serve"``), removed with
    everything in it when the block ends."""
    check_name(purpose, "scratch purpose")
    root = Path(root) if root is not None else scratch_root()
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise storage_error(exc, root) from None
    sweep_stale(root)
    directory = root / f"{purpose}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        directory.mkdir(mode=0o700)
        fd = os.open(directory / OWNER_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        shutil.rmtree(directory, ignore_errors=True)
        raise storage_error(exc, directory) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        os.close(fd)
