"""User-facing errors: one clear line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NoReturn

USAGE_ERROR_STATUS = 2
# Exit status after a closed pipe on stdout (`script | head`), as in Python's documentation on SIGPIPE.
BROKEN_PIPE_STATUS = 1
DISK_FULL_ERRORS = (errno.ENOSPC, errno.EDQUOT)


class UserError(Exception):
    """Bad input from the user: a missing file, a bad flag value, an invalid plan.

    The message must name the file, key or flag at fault and say what is allowed.
    """


def warn(message: str) -> None:
    """A one-line `warning: ...` on stderr for something the user should know but that is not fatal."""
    print(f"warning: {message}", file=sys.stderr)


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Name `path` in an OSError raised inside that names no file: `os.write` and `file.write` never do,
    so a full disk would otherwise be reported without saying what was being written."""
    try:
        yield
    except OSError as error:
        if error.filename is None:
            error.filename = str(path)
        raise


def run_cli(
    main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None
) -> NoReturn:
    """Run an entry script's `main`: a UserError or a full disk becomes `error: ...` and exit status 2,
    a reader that closed stdout early (`script | head`) ends the run quietly."""
    try:
        status = main(argv)
        sys.stdout.flush()  # a closed pipe shows here, not as an ignored exception at interpreter exit
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(USAGE_ERROR_STATUS)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        _discard_standard_output()
        sys.exit(BROKEN_PIPE_STATUS)
    except OSError as error:
        if error.errno not in DISK_FULL_ERRORS:
            raise
        print(f"error: {_disk_full_message(error)}", file=sys.stderr)
        sys.exit(USAGE_ERROR_STATUS)
    sys.exit(status or 0)


def _disk_full_message(error: OSError) -> str:
    """`FILE: no space left on device while writing; ...` (or `disk quota exceeded`)."""
    where = f"{error.filename}: " if error.filename else ""
    return (
        f"{where}{os.strerror(error.errno).lower()} while writing; "
        "free some space or write elsewhere, then run again"
    )


def _discard_standard_output() -> None:
    """Point stdout at /dev/null: Python flushes it once more at exit, which would fail on the closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
