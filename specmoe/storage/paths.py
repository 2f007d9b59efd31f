"""Names that become paths, and the only way the project deletes anything.

A name from a config, a manifest or the command line (a predictor label, a stage output, a
shard file) must match :data:`SAFE_NAME` before it is joined to a directory, and the joined
path must stay inside that directory once resolved. Deletion goes through
:func:`remove_inside`, which refuses anything outside the root it is given, the root itself,
and never follows a symbolic link out of it.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from specmoe.errors import InputError

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+:-]{0,99}")
"""One path component: starts with a letter or digit (so never ``.``, ``..`` or hidden),
then letters, digits, ``. _ + : -`` (``:`` joins a predictor and its preset); at most 100
characters; never a path separator."""


METADATA_PREFIX = ".specmoe"
"""Files the project keeps beside its outputs (locks, verified markers) start with this."""


def is_project_metadata(name: str) -> bool:
    """Whether a file name is one of the project's own bookkeeping files, not user data."""
    return name.startswith(METADATA_PREFIX)


class UnsafePathError(InputError):
    """A name or path that would leave the directory it belongs to."""


def check_name(name: object, what: str) -> str:
    """``name`` if it is a safe single path component, else a one-line error naming ``what``."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
        raise UnsafePathError(
            f"{what} {name!r} is not a safe name: use 1-100 letters, digits, '.', '_', '+', ':' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_relative(relative: str | Path, what: str) -> Path:
    """A relative path whose every component is a safe name (``predictors/token-small``)."""
    parts = Path(relative).parts
    if not parts or Path(relative).is_absolute():
        raise UnsafePathError(f"{what} {str(relative)!r} must be a relative path of safe names")
    for part in parts:
        check_name(part, what)
    return Path(*parts)


def is_inside(root: str | Path, path: str | Path) -> bool:
    """Whether ``path`` lies strictly inside ``root``: its parent directory, with every
    symbolic link resolved, is ``root`` or below it. The last component is not resolved, so a
    link placed in ``root`` counts as inside (it is the link that gets written or removed)."""
    path = Path(path)
    if path.name in ("", ".", ".."):
        return False
    root_resolved = Path(root).resolve()
    parent = path.parent.resolve()
    return parent == root_resolved or parent.is_relative_to(root_resolved)


def join_inside(root: str | Path, relative: str | Path, what: str = "path") -> Path:
    """``root / relative`` after checking ``relative``'s names and that no directory on the way
    is a symbolic link leading out of ``root``."""
    path = Path(root) / check_relative(relative, what)
    if not is_inside(root, path):
        raise UnsafePathError(
            f"{what} {str(relative)!r} lies in {path.parent.resolve()}, outside {Path(root).resolve()} "
            "(a symbolic link leads out); remove the link or choose another directory"
        )
    return path


def remove_inside(root: str | Path, path: str | Path) -> bool:
    """Delete the file or directory tree ``path`` if it lies inside ``root``; returns whether
    something was removed. A symbolic link is removed itself, never what it points to; a path
    outside ``root`` (or ``root`` itself) raises instead of being touched."""
    path = Path(path)
    if not is_inside(root, path):
        raise UnsafePathError(f"refusing to delete {path}: it is not inside {Path(root).resolve()}")
    if path.is_symlink() or path.is_file():
        path.unlink()
        return True
    if path.is_dir():
        shutil.rmtree(path)  # rmtree unlinks links inside the tree and does not follow them
        return True
    if os.path.lexists(path):
        path.unlink()
        return True
    return False
