"""Errors that the CLI turns into a one-line message instead of a traceback."""

from __future__ import annotations

import errno
import os
import re


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


_ERRNO_IN_TEXT = re.compile(r"(?:os error|errno) (\d+)", re.IGNORECASE)


def os_errno(exc: BaseException) -> int | None:
    """The OS error number behind ``exc``: an ``OSError``'s own, or one that a library
    (safetensors, pyarrow) wrote into its message as ``os error 28`` / ``[errno 28]``."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno
    found = _ERRNO_IN_TEXT.search(str(exc))
    return int(found.group(1)) if found else None


def os_error_message(exc: BaseException, path: object = None) -> str:
    """One line for an OS error: the path involved (``path``, else the error's own), what
    went wrong and what to do."""
    where = path or getattr(exc, "filename", None)
    code = os_errno(exc)
    reason = _REMEDIES.get(code) or f"{os.strerror(code) if code else exc} (errno {code}): check the path and rerun"
    return f"{where}: {reason}" if where else reason


def storage_error(exc: BaseException, path: object = None) -> StorageError:
    """The :class:`StorageError` for ``exc`` (an OS error, or a library's error caused by
    one), naming ``path``."""
    return StorageError(os_error_message(exc, path))
