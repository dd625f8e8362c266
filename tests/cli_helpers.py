"""Entry scripts run in-process through run_cli, exactly as their command lines run them."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest

from lib.core.errors import run_cli


def error_line(capsys: pytest.CaptureFixture, main: Callable, argv: Sequence[str]) -> str:
    """Run `main` with `argv`; check exit status 2 and return its single (non-blank) stderr line."""
    capsys.readouterr()  # drop anything printed while preparing (fixture builds)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, list(argv))
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]
