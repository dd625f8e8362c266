"""Write outputs under a temporary sibling name and rename them into place only when complete.

Everything is durable before it gets its final name: every file (and, for a directory, every folder
in it) is fsync'ed before the rename, and the parent directory after it, so even after a power loss
the final name holds the previous content or the complete new one, never a part.

A directory is built in `.NAME.<pid>.<token>.partial`. Replacing an existing one moves the old one
aside to `.NAME.<pid>.<token>.replaced` (same pid and token), renames the new one into place and
then deletes the old one. The names are strict so that `recover_interrupted` can tell the leftovers
of this NAME's killed runs from those of any other output and from a run still going.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lib.core.errors import UserError, writing

_STAGING = "partial"
_RETIRED = "replaced"


def check_writable_destination(path: Path, flag: str) -> None:
    """Fail early, before any expensive work, when `path` cannot be created."""
    parent = path.absolute().parent
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UserError(f"{flag} {path}: directory {parent} is not writable")
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a directory, expected a file path")


def check_new_directory(path: Path, flag: str) -> None:
    """Fail early, before any expensive work, when `path` exists or its parent does not."""
    if path.exists():
        raise UserError(f"{flag} {path}: already exists; pass a new directory name")
    if not path.absolute().parent.is_dir():
        raise UserError(f"{flag} {path}: parent directory {path.absolute().parent} does not exist")


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it to `path`, on failure delete it.

    The rename is atomic on one filesystem, so a reader never sees a half-written file and a
    crash never leaves anything under the final name. An OSError that names no file (a full disk,
    say) is made to name `path`.
    """
    path = Path(path)
    with writing(path):
        handle, temporary_name = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=".partial", dir=path.absolute().parent
        )
    os.close(handle)
    temporary = Path(temporary_name)
    try:
        with writing(path):
            yield temporary
        os.chmod(temporary, _creation_mode(0o666))
        _sync(temporary)
        os.replace(temporary, path)
        _sync(path.absolute().parent)
    finally:
        temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(path: Path, replace_existing: bool = False) -> Iterator[Path]:
    """Like `atomic_file` for a directory: build it under a temporary sibling, rename when complete.

    The caller must have checked that `path` does not exist, or pass `replace_existing=True` to
    swap an existing directory out only once the new one is complete.
    """
    path = Path(path)
    temporary = _make_staging_directory(path)
    try:
        yield temporary
        _sync_tree(temporary)
        if replace_existing and path.exists():
            _swap_directories(temporary, path)
        else:
            os.replace(temporary, path)
            _sync(path.absolute().parent)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)


def _creation_mode(requested: int) -> int:
    """The mode `open` would have given: `requested` less the process umask.

    mkstemp creates private (0600) files; without this the finished output would stay unreadable
    to the group and others, unlike any file the user writes by hand.
    """
    umask = os.umask(0)
    os.umask(umask)
    return requested & ~umask


def _leftover_name(path: Path, process_id: int, token: str, kind: str) -> Path:
    path = path.absolute()
    return path.parent / f".{path.name}.{process_id}.{token}.{kind}"


def _make_staging_directory(path: Path) -> Path:
    """An empty `.NAME.<pid>.<token>.partial`, created with the mode a plain mkdir gives."""
    while True:
        staging = _leftover_name(path, os.getpid(), secrets.token_hex(4), _STAGING)
        try:
            os.mkdir(staging)
            return staging
        except FileExistsError:
            continue


def _swap_directories(new: Path, path: Path) -> None:
    """Move the old `path` aside, rename `new` into place, then delete the old one.

    The retired name shares `new`'s pid and token, so a run killed between the two renames leaves a
    pair that `recover_interrupted` recognises: the old output and the complete new one.
    """
    retired = new.with_name(new.name.removesuffix(_STAGING) + _RETIRED)
    os.rename(path, retired)
    os.rename(new, path)
    _sync(path.absolute().parent)
    shutil.rmtree(retired, ignore_errors=True)


def _sync(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes the names in it durable)."""
    descriptor = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _sync_tree(directory: Path) -> None:
    """fsync every regular file and every folder under `directory`, the folders after their contents.

    Files their writer already synced (sharded_ablate.py's shards, synced in the background while
    the next one is written) cost next to nothing here; this pass covers every other file.
    """
    for folder, _, files in os.walk(directory, topdown=False):
        for name in files:
            file = Path(folder, name)
            if not file.is_symlink():
                _sync(file)
        _sync(Path(folder))


@dataclass(frozen=True)
class _Leftover:
    """A temporary directory of `atomic_directory`, found beside its output."""

    path: Path
    process_id: int
    token: str
    kind: str  # _STAGING or _RETIRED


def _leftovers(path: Path) -> list[_Leftover]:
    """The staging and retired directories of `path` itself (never those of another output)."""
    path = path.absolute()
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.([0-9a-f]{{8}})\.({_STAGING}|{_RETIRED})")
    found = []
    for candidate in sorted(path.parent.iterdir()):
        match = pattern.fullmatch(candidate.name)
        if match and candidate.is_dir() and not candidate.is_symlink():
            found.append(_Leftover(candidate, int(match[1]), match[2], match[3]))
    return found


def recover_interrupted(path: Path) -> list[str]:
    """Clean up after runs on `path` that were killed, keeping one complete output; call only under its lock.

    A staging directory whose process still runs is kept. A replacement killed between its two
    renames is finished (the new output is complete, or the swap would not have begun), or, failing
    a new output, the old one is renamed back. A retired old output is deleted only once `path`
    exists again. Returns one line per action, to show the user.
    """
    path = Path(path)
    actions = []
    dead = []
    for leftover in _leftovers(path):
        if _is_running(leftover.process_id):
            actions.append(f"kept {leftover.path}: its process {leftover.process_id} is still running")
        else:
            dead.append(leftover)
    if not path.exists() and not path.is_symlink():
        actions += _put_an_output_back(path, dead)
    for leftover in dead:
        if not leftover.path.exists():
            continue  # renamed into place above
        shutil.rmtree(leftover.path, ignore_errors=True)
        why = (
            "left by an interrupted run"
            if leftover.kind == _STAGING
            else "the previous output, already replaced when its run was interrupted"
        )
        actions.append(f"removed {leftover.path}, {why}")
    return actions


def _put_an_output_back(path: Path, dead: list[_Leftover]) -> list[str]:
    """`path` is missing: a replacement was killed between its renames if a retired directory is there."""
    staged = {
        (leftover.process_id, leftover.token): leftover for leftover in dead if leftover.kind == _STAGING
    }
    for retired in (leftover for leftover in dead if leftover.kind == _RETIRED):
        new = staged.get((retired.process_id, retired.token))
        if new is not None:
            os.rename(new.path, path)
            _sync(path.absolute().parent)
            return [
                f"finished the replacement an interrupted run began: moved its complete new output "
                f"{new.path.name} to {path}"
            ]
        os.rename(retired.path, path)
        _sync(path.absolute().parent)
        return [
            f"restored the previous output {path} from {retired.path.name}, "
            "where an interrupted replacement had moved it"
        ]
    return []


def _is_running(process_id: int) -> bool:
    try:
        os.kill(process_id, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


_FREE_SPACE_MARGIN_BYTES = 64 << 20  # headroom for the filesystem's own bookkeeping


def check_free_space(output: Path, needed_bytes: int, flag: str = "output") -> None:
    parent = output.absolute().resolve().parent
    free = shutil.disk_usage(parent).free
    if needed_bytes + _FREE_SPACE_MARGIN_BYTES > free:
        margin = _readable_size(_FREE_SPACE_MARGIN_BYTES)
        raise UserError(
            f"{flag} {output}: needs {_readable_size(needed_bytes)} plus a {margin} safety margin "
            f"but only {_readable_size(free)} is free on the filesystem of {parent}; "
            "free some space or choose another output"
        )


def _readable_size(count: int) -> str:
    """In GB from 1 GB on, else in MB, so that a small output never reads "needs 0.00 GB"."""
    return f"{count / 1e9:.2f} GB" if count >= 1e9 else f"{count / 1e6:.1f} MB"
