"""User-facing errors: one clear line on stderr and exit status 2, never a traceback."""
from __future__ import annotations

import sys
from typing import Callable, NoReturn, Sequence

USAGE_ERROR_STATUS = 2


class UserError(Exception):
    """Bad input from the user: a missing file, a bad flag value, an invalid plan.

    The message must name the file, key or flag at fault and say what is allowed.
    """


def warn(message: str) -> None:
    """A one-line `warning: ...` on stderr for something the user should know but that is not fatal."""
    print(f"warning: {message}", file=sys.stderr)


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> NoReturn:
    """Run an entry script's `main`, turning a UserError into `error: ...` and exit status 2."""
    try:
        status = main(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(USAGE_ERROR_STATUS)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(status or 0)
