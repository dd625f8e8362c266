"""Prompt files: one loader for every stage, five formats, one-line errors naming the flag and file.

Formats (chosen by the file's extension):
  .txt      one prompt per line (lines end at LF, CR LF or CR only); line endings and blank lines are dropped
  .json     a list of strings, or of objects with a `text`, `prompt` or `instruction` field
  .jsonl    one JSON string or object (same fields) per line
  .csv      a header row with a `text` or `prompt` column
  .parquet  a `text` or `prompt` column
Prompts that are empty or only whitespace are dropped in every format.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lib.core.errors import UserError

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]  # lib/core/prompts.py
DATA_DIRECTORY = REPOSITORY_ROOT / "data"
DEFAULT_HARMFUL_PROMPTS = DATA_DIRECTORY / "harmful.txt"
DEFAULT_HARMLESS_PROMPTS = DATA_DIRECTORY / "harmless.txt"
DEFAULT_EVALUATION_HARMFUL_PROMPTS = DATA_DIRECTORY / "eval_harmful.txt"
DEFAULT_EVALUATION_HARMLESS_PROMPTS = DATA_DIRECTORY / "eval_harmless.txt"

# One prompt in five of each measurement set, chosen by a hash of its text (so by content, not by
# position or file order), is held back from measure.py for search.py to score plans on.
SEARCH_HOLD_BACK_ONE_IN = 5
SEARCH_HOLD_BACK_RULE = f"int(sha256(prompt)[:8], 16) % {SEARCH_HOLD_BACK_ONE_IN} == 0"

OBJECT_FIELDS = ("text", "prompt", "instruction")
TABLE_COLUMNS = ("text", "prompt")


class _BadPromptFile(Exception):
    """Raised by a format reader; turned into a UserError naming the flag and file."""


def _lines(text: str) -> list[str]:
    """The lines of `text` read by `_read_text`, which has already turned CR LF and CR into LF.

    Not `str.splitlines`: it also splits at form feeds, U+2028 and other separators, which belong
    to the prompt they sit in (and may sit inside a JSON string).
    """
    return text.split("\n")


def _text_prompts(path: Path) -> list[str]:
    return _lines(_read_text(path))


def _prompt_from_item(item: Any, where: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for field in OBJECT_FIELDS:
            if isinstance(item.get(field), str):
                return item[field]
    raise _BadPromptFile(
        f"{where} is neither a string nor an object with a {_quoted(OBJECT_FIELDS)} string field"
    )


def _json_prompts(path: Path) -> list[str]:
    try:
        items = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise _BadPromptFile(f"invalid JSON ({error})") from None
    if not isinstance(items, list):
        raise _BadPromptFile(f"expected a JSON list of prompts, got a {type(items).__name__}")
    return [_prompt_from_item(item, f"item {index}") for index, item in enumerate(items)]


def _jsonl_prompts(path: Path) -> list[str]:
    prompts = []
    for number, line in enumerate(_lines(_read_text(path)), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise _BadPromptFile(f"line {number}: invalid JSON ({error})") from None
        prompts.append(_prompt_from_item(item, f"line {number}"))
    return prompts


def _table_column(columns: list[str]) -> str:
    for name in TABLE_COLUMNS:
        if name in columns:
            return name
    raise _BadPromptFile(f"has no {_quoted(TABLE_COLUMNS)} column (columns: {', '.join(columns) or 'none'})")


def _csv_prompts(path: Path) -> list[str]:
    try:
        reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
        column = _table_column(list(reader.fieldnames or []))
        return [row[column] or "" for row in reader]
    except csv.Error as error:
        raise _BadPromptFile(f"invalid CSV ({error})") from None


def _parquet_prompts(path: Path) -> list[str]:
    import pyarrow
    import pyarrow.parquet

    try:
        schema_names = pyarrow.parquet.read_schema(path).names
        column = _table_column(schema_names)
        values = pyarrow.parquet.read_table(path, columns=[column]).column(column).to_pylist()
    except (pyarrow.ArrowException, OSError) as error:
        raise _BadPromptFile(f"not a readable parquet file ({_first_line(error)})") from None
    return [_prompt_from_item(value, f"row {index}") for index, value in enumerate(values)]


READERS: dict[str, Callable[[Path], list[str]]] = {
    ".txt": _text_prompts,
    ".json": _json_prompts,
    ".jsonl": _jsonl_prompts,
    ".csv": _csv_prompts,
    ".parquet": _parquet_prompts,
}


def load_prompts(path: Path, flag: str) -> list[str]:
    """Read the prompts of `path` (format by extension); blank prompts are dropped.

    Every problem (missing, unreadable, unknown type, malformed, no prompts) is a one-line
    UserError that starts with `flag` and the file name.
    """
    path = Path(path)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise UserError(
            f"{flag} {path}: unknown prompt-file type '{path.suffix}'; allowed: {', '.join(READERS)}"
        )
    if not path.exists():
        raise UserError(f"{flag} {path}: file not found")
    if not path.is_file():
        raise UserError(f"{flag} {path}: not a regular file")
    try:
        prompts = [prompt for prompt in reader(path) if prompt.strip()]
    except _BadPromptFile as error:
        raise UserError(f"{flag} {path}: {error}") from None
    except OSError as error:
        raise UserError(f"{flag} {path}: cannot read ({error.strerror or _first_line(error)})") from None
    if not prompts:
        raise UserError(f"{flag} {path}: contains no prompts")
    return prompts


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, recorded in outputs so a result can be traced to its prompts."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise _BadPromptFile(f"not UTF-8 text (byte {error.start})") from None


def _quoted(names: tuple[str, ...]) -> str:
    return "/".join(f"'{name}'" for name in names)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def is_held_back_for_search(prompt: str) -> bool:
    return int(hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:8], 16) % SEARCH_HOLD_BACK_ONE_IN == 0


def split_for_search(prompts: list[str]) -> tuple[list[str], list[str]]:
    """(prompts to measure on, prompts held back for search.py), each in file order."""
    held_back = [is_held_back_for_search(prompt) for prompt in prompts]
    return (
        [prompt for prompt, back in zip(prompts, held_back) if not back],
        [prompt for prompt, back in zip(prompts, held_back) if back],
    )
