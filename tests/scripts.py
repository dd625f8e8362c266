"""Running an entry script as the command line does: in-process, which is quick, or as its own process,
which also proves the script file itself but costs seconds (a new interpreter importing torch)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import pytest

from lib.core.errors import run_cli

REPOSITORY = Path(__file__).resolve().parent.parent

# Runs the test both ways; the process variant is in the slow tier only (pytest -m "not slow" skips it).
IN_PROCESS_AND_AS_A_PROCESS = pytest.mark.parametrize(
    "as_a_process", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["in-process", "process"]
)


class ScriptRun(NamedTuple):
    status: int
    out: str
    err: str


def run_script(
    script: str, arguments: Sequence[str], capsys: pytest.CaptureFixture, *, as_a_process: bool
) -> ScriptRun:
    """`python SCRIPT.py ARGUMENTS...` from the repository root, or its `main` through run_cli in-process."""
    if as_a_process:
        done = subprocess.run(
            [sys.executable, f"{script}.py", *arguments],
            cwd=REPOSITORY,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        return ScriptRun(done.returncode, done.stdout, done.stderr)
    module = importlib.import_module(script)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        run_cli(module.main, list(arguments))
    captured = capsys.readouterr()
    return ScriptRun(stopped.value.code, captured.out, captured.err)
