"""Write outputs under a temporary sibling name and rename them into place only when complete."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from lib.errors import UserError


def check_writable_destination(path: Path, flag: str) -> None:
    """Fail early, before any expensive work, when `path` cannot be created."""
    parent = path.absolute().parent
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UserError(f"{flag} {path}: directory {parent} is not writable")
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a directory, expected a file path")


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it to `path`, on failure delete it.

    The rename is atomic on one filesystem, so a reader never sees a half-written file and a
    crash never leaves anything under the final name.
    """
    path = Path(path)
    handle, temporary_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.absolute().parent)
    os.close(handle)
    temporary = Path(temporary_name)
    try:
        yield temporary
        os.chmod(temporary, _creation_mode(0o666))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(path: Path, replace_existing: bool = False) -> Iterator[Path]:
    """Like `atomic_file` for a directory: build it under a temporary sibling, rename when complete.

    The caller must have checked that `path` does not exist, or pass `replace_existing=True` to
    swap an existing directory out only once the new one is complete.
    """
    path = Path(path)
    temporary = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.absolute().parent))
    try:
        yield temporary
        os.chmod(temporary, _creation_mode(0o777))
        if replace_existing and path.exists():
            _swap_directories(temporary, path)
        else:
            os.replace(temporary, path)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)


def _creation_mode(requested: int) -> int:
    """The mode `open` or `mkdir` would have given: `requested` less the process umask.

    mkstemp and mkdtemp create private (0600 / 0700) entries; without this the finished output
    would stay unreadable to the group and others, unlike any file the user writes by hand.
    """
    umask = os.umask(0)
    os.umask(umask)
    return requested & ~umask


def _swap_directories(new: Path, path: Path) -> None:
    """Move the old `path` aside, rename `new` into place, then delete the old one."""
    retired = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".replaced", dir=path.absolute().parent))
    os.rmdir(retired)
    os.rename(path, retired)
    os.rename(new, path)
    shutil.rmtree(retired, ignore_errors=True)
