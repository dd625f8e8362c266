"""README.md and docs/: every command they show uses only flags its script's --help lists."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parent.parent
DOCUMENTS = [REPOSITORY / "README.md", *sorted((REPOSITORY / "docs").glob("*.md"))]
COMMAND = re.compile(r"python3? (?P<script>[\w/]+)\.py(?P<arguments>[^`|;&\n]*)")
FLAG = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")


def documented_commands() -> list[tuple[str, str, str]]:
    """(where, script, its arguments) of every `python SCRIPT.py ...` in the documents; shell line
    continuations are joined and comments dropped."""
    commands = []
    for document in DOCUMENTS:
        text = document.read_text().replace("\\\n", " ")
        for number, line in enumerate(text.splitlines(), 1):
            for match in COMMAND.finditer(line):
                arguments = match["arguments"].split("#")[0]
                commands.append((f"{document.name}:{number}", match["script"], arguments))
    return commands


def help_flags(script: str, capsys: pytest.CaptureFixture) -> set[str]:
    """The flags the script's own --help prints."""
    module = importlib.import_module(script.replace("/", "."))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        module.main(["--help"])
    return set(FLAG.findall(capsys.readouterr().out))


def test_documented_commands_use_existing_flags(capsys: pytest.CaptureFixture) -> None:
    commands = documented_commands()
    scripts = {script for _, script, _ in commands}
    assert scripts >= {"measure", "analyze", "sharded_ablate", "chat", "evaluate"}
    flags = {script: help_flags(script, capsys) for script in scripts}
    unknown = [
        f"{where}: {script}.py has no {flag}"
        for where, script, arguments in commands
        for flag in FLAG.findall(arguments)
        if flag not in flags[script]
    ]
    assert unknown == []
