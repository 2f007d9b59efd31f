"""Errors that the CLI turns into a one-line message instead of a traceback."""

from __future__ import annotations

import errno


class SpecmoeError(Exception):
    """Base class: the message says what was wrong and what is expected."""


class InputError(SpecmoeError):
    """Bad user input: a missing or malformed file, an unknown name, a bad option."""


class UnsupportedModelError(SpecmoeError):
    """The checkpoint's ``model_type`` has no adapter."""


class CorruptDataError(SpecmoeError):
    """A file whose content is not what was written: checksum mismatch, undecodable bytes,
    values out of range. It is never used; the message names the file and what to do."""


class CorruptStoreError(CorruptDataError):
    """A trace store whose files do not match its manifest."""


class PeerError(SpecmoeError):
    """Under torchrun: another rank's error, already reported by that rank (printed once)."""


class StorageError(SpecmoeError):
    """The operating system refused a read or write (disk full, no permission, ...)."""


_REMEDIES = {
    errno.ENOSPC: "no space left on the device: free space there or choose another output directory, "
    "then rerun the same command (finished work is kept)",
    errno.EDQUOT: "disk quota exceeded: free space or choose another output directory, then rerun",
    errno.EACCES: "permission denied: choose a directory you can write to, or fix its permissions",
    errno.EPERM: "operation not permitted: choose a directory you own, or fix its permissions",
    errno.EROFS: "the file system is read-only: choose a writable output directory",
    errno.ENOENT: "no such file or directory: check the path",
    errno.ENOTDIR: "a part of the path is a file, not a directory: check the path",
    errno.EISDIR: "is a directory, not a file: check the path",
    errno.EIO: "input/output error from the device: check the disk, then rerun",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n) and rerun",
}


def os_error_message(exc: OSError, path: object = None) -> str:
    """One line for an OS error: the path involved (``path``, else the error's own), what
    went wrong and what to do."""
    where = path or exc.filename
    reason = _REMEDIES.get(exc.errno, f"{exc.strerror or exc} (errno {exc.errno}): check the path and rerun")
    return f"{where}: {reason}" if where else reason


def storage_error(exc: OSError, path: object = None) -> StorageError:
    """The :class:`StorageError` for ``exc``, naming ``path``."""
    return StorageError(os_error_message(exc, path))
