"""Safety around the output directory (SPEC §5), checked before anything is written.

* The output may not be the input, lie inside it, or (with --overwrite) contain it.
* An existing output is refused unless --overwrite; it is then replaced only once the new one is complete,
  and only if it is a previous output of this tool holding nothing but the files that run wrote, so that
  nothing a user owns is ever deleted.
* Enough free disk space must be there before the first byte is written.
* One run per output at a time: a lock file beside the output, held with `flock`, which the kernel
  releases when the process dies however it dies, so a lock left by a killed run is recognised as
  stale and taken over. Under that lock, lib.core.atomic.recover_interrupted cleans up after killed runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from lib.ablate.record import PLAN_FILE_NAME, TOOL_NAME, files_written_by_this_tool, output_entries
from lib.core.errors import UserError


def check_output_location(output: Path, input_directory: Path, overwrite: bool, flag: str = "output") -> None:
    output_path = output.absolute().resolve()
    input_path = input_directory.absolute().resolve()
    if output_path == input_path or input_path in output_path.parents:
        raise UserError(
            f"{flag} {output}: is or lies inside the input model directory {input_path}; "
            "choose a directory outside it (the input is never modified)"
        )
    if overwrite and output_path in input_path.parents:
        raise UserError(
            f"{flag} {output}: contains the input model directory {input_path}; "
            "--overwrite would delete the input, choose another output"
        )
    parent = output_path.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {output}: parent directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UserError(f"{flag} {output}: parent directory {parent} is not writable")
    if output_path.exists() or output_path.is_symlink():
        if not overwrite:
            raise UserError(
                f"{flag} {output}: already exists; pass --overwrite to replace it once the new output is complete"
            )
        if not output_path.is_dir() or output.is_symlink():  # output_path is resolved: ask the name given
            raise UserError(
                f"{flag} {output}: exists and is not a directory; --overwrite only replaces a directory"
            )
        _check_replaceable(output, flag)


def _check_replaceable(output: Path, flag: str = "output") -> None:
    """--overwrite deletes the old output: allow it only for one this tool wrote, with nothing added since."""
    written = files_written_by_this_tool(output)
    if written is None:
        reason = (
            f"no {PLAN_FILE_NAME}"
            if not (output / PLAN_FILE_NAME).exists()
            else f"its {PLAN_FILE_NAME} does not list the files {TOOL_NAME} wrote there"
        )
        raise UserError(
            f"{flag} {output}: exists and was not written by {TOOL_NAME} ({reason}); "
            "--overwrite only replaces a previous output of this tool, "
            "choose another output or remove it yourself"
        )
    added = sorted(set(output_entries(output)) - written)
    if added:
        shown = ", ".join(added[:5]) + (f" and {len(added) - 5} more" if len(added) > 5 else "")
        raise UserError(
            f"{flag} {output}: holds files {TOOL_NAME} did not write ({shown}); "
            "--overwrite would delete them, move them out or choose another output"
        )


def lock_path(output: Path) -> Path:
    output = output.absolute()
    return output.parent / f".{output.name}.lock"


@contextlib.contextmanager
def output_lock(output: Path, flag: str = "output") -> Iterator[None]:
    """Hold the output's lock for the duration; a second run on the same output is refused."""
    path = lock_path(output)
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(descriptor)
            os.close(descriptor)
            raise UserError(
                f"{flag} {output}: another run ({holder}) is writing it; wait for it to finish"
            ) from None
        # The previous holder may have deleted the file between our open and our lock: lock the current one.
        if _same_file(descriptor, path):
            break
        os.close(descriptor)
    try:
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"pid {os.getpid()}\n".encode())
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(descriptor)


def _same_file(descriptor: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(descriptor).st_ino
    except FileNotFoundError:
        return False


def _read_holder(descriptor: int) -> str:
    content = os.pread(descriptor, 100, 0).decode(errors="replace").strip()
    return content or "process unknown"
