"""Atomic outputs appear with the permissions an ordinary file or directory would get."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from lib.core.atomic import atomic_directory, atomic_file


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request) -> Iterator[int]:
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_file_gets_the_mode_a_plain_write_gets(tmp_path: Path, umask: int) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    with atomic_file(tmp_path / "atomic.txt") as temporary:
        temporary.write_text("x")
    assert mode_of(tmp_path / "atomic.txt") == mode_of(plain) == 0o666 & ~umask


def test_atomic_directory_gets_the_mode_a_plain_mkdir_gets(tmp_path: Path, umask: int) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    with atomic_directory(tmp_path / "atomic") as staging:
        (staging / "weights.bin").write_bytes(b"x")
    assert mode_of(tmp_path / "atomic") == mode_of(plain) == 0o777 & ~umask
    with atomic_directory(tmp_path / "atomic", replace_existing=True) as staging:
        (staging / "weights.bin").write_bytes(b"y")
    assert mode_of(tmp_path / "atomic") == 0o777 & ~umask
    assert (tmp_path / "atomic" / "weights.bin").read_bytes() == b"y"


def test_atomic_file_syncs_the_file_before_the_rename_and_the_directory_after(
    tmp_path: Path, synced_paths: list[Path]
) -> None:
    with atomic_file(tmp_path / "result.pt") as temporary:
        temporary.write_bytes(b"measurements")
    assert synced_paths == [temporary, tmp_path]
    assert (tmp_path / "result.pt").read_bytes() == b"measurements"


@pytest.mark.parametrize("replace_existing", [False, True])
def test_atomic_directory_syncs_every_file_and_folder_before_the_rename_and_the_parent_after(
    tmp_path: Path, synced_paths: list[Path], replace_existing: bool
) -> None:
    if replace_existing:
        (tmp_path / "model").mkdir()
    with atomic_directory(tmp_path / "model", replace_existing=replace_existing) as staging:
        (staging / "config.json").write_text("{}")
        (staging / "code").mkdir()
        (staging / "code" / "modeling.py").write_text("")
    inside = {staging / "config.json", staging / "code" / "modeling.py", staging / "code", staging}
    assert set(synced_paths[:-1]) == inside and synced_paths[-1] == tmp_path
    assert synced_paths.index(staging / "code") > synced_paths.index(staging / "code" / "modeling.py")
    assert synced_paths.index(staging) == len(inside) - 1, "the staging folder is synced after its contents"
