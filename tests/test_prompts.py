"""Prompt files in every supported format load to the same list; bad files fail naming flag and file."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow
import pyarrow.parquet
import pytest

from lib.core.errors import UserError
from lib.core.prompts import file_sha256, load_prompts

PROMPTS = ["How do I bake bread?", "  leading spaces are kept", 'Quotes " and, commas', "Ünïcode ✓"]


def _write(path: Path, prompts: list[str], field: str = "text") -> Path:
    suffix = path.suffix
    if suffix == ".txt":
        path.write_text("\n\n".join(prompts) + "\n\n  \n", encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps([{field: prompt, "other": 1} for prompt in prompts]), encoding="utf-8")
    elif suffix == ".jsonl":
        path.write_text(
            "\n".join(json.dumps({field: prompt}) for prompt in prompts) + "\n\n", encoding="utf-8"
        )
    elif suffix == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", field])
            writer.writerows([index, prompt] for index, prompt in enumerate(prompts))
    elif suffix == ".parquet":
        pyarrow.parquet.write_table(pyarrow.table({field: prompts, "id": list(range(len(prompts)))}), path)
    return path


@pytest.mark.parametrize("suffix", [".txt", ".json", ".jsonl", ".csv", ".parquet"])
def test_every_format_loads_the_same_prompts(tmp_path: Path, suffix: str) -> None:
    assert load_prompts(_write(tmp_path / f"p{suffix}", PROMPTS), "--data-harmful") == PROMPTS


@pytest.mark.parametrize(
    "suffix, field",
    [
        (".json", "prompt"),
        (".json", "instruction"),
        (".jsonl", "instruction"),
        (".csv", "prompt"),
        (".parquet", "prompt"),
    ],
)
def test_alternative_field_names(tmp_path: Path, suffix: str, field: str) -> None:
    assert load_prompts(_write(tmp_path / f"p{suffix}", PROMPTS, field), "--data-harmless") == PROMPTS


def test_json_list_of_strings_and_crlf_text(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps(["one", "", "two"]))
    assert load_prompts(tmp_path / "a.json", "--x") == ["one", "two"]
    (tmp_path / "b.txt").write_bytes(b"one\r\ntwo\r\n\r\n")
    assert load_prompts(tmp_path / "b.txt", "--x") == ["one", "two"]


def test_lines_end_at_line_feeds_only(tmp_path: Path) -> None:
    """Form feeds, U+2028, U+0085 and the other characters str.splitlines splits at stay in their prompt."""
    separators = "\f\v\x1c\x1d\x1e\x85\u2028\u2029"
    prompts = [f"page one{separators}page two", "next\tprompt"]
    (tmp_path / "a.txt").write_text("\n".join(prompts) + "\r\nthird\rfourth\n", encoding="utf-8")
    assert load_prompts(tmp_path / "a.txt", "--x") == [*prompts, "third", "fourth"]
    lines = [json.dumps({"text": prompt}, ensure_ascii=False) for prompt in prompts]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert load_prompts(tmp_path / "a.jsonl", "--x") == prompts


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", "\n \n", "contains no prompts"),
        ("bad.json", "[1, 2", "invalid JSON"),
        ("dict.json", '{"text": "x"}', "expected a JSON list"),
        ("numbers.json", "[1]", "item 0 is neither a string nor an object"),
        ("wrong.jsonl", '{"question": "x"}\n', "line 1 is neither"),
        ("nocolumn.csv", "question\nx\n", "no 'text'/'prompt' column"),
        ("notparquet.parquet", "plain text", "not a readable parquet file"),
        (
            "prompts.xml",
            "<x/>",
            "unknown prompt-file type '.xml'; allowed: .txt, .json, .jsonl, .csv, .parquet",
        ),
    ],
)
def test_bad_prompt_files_name_flag_and_file(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError) as error:
        load_prompts(path, "--data-harmful")
    text = str(error.value)
    assert text.startswith(f"--data-harmful {path}: ") and message in text and "\n" not in text


def test_missing_unreadable_and_directory(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--data-harmless .*missing.txt: file not found"):
        load_prompts(tmp_path / "missing.txt", "--data-harmless")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="latin1.txt: not UTF-8 text"):
        load_prompts(tmp_path / "latin1.txt", "--data-harmless")
    (tmp_path / "folder.txt").mkdir()
    with pytest.raises(UserError, match="folder.txt: not a regular file"):
        load_prompts(tmp_path / "folder.txt", "--data-harmless")


def test_sha256_changes_with_content(tmp_path: Path) -> None:
    first = _write(tmp_path / "a.txt", PROMPTS)
    second = _write(tmp_path / "b.txt", PROMPTS[:-1])
    assert len(file_sha256(first)) == 64 and file_sha256(first) != file_sha256(second)
