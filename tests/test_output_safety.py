"""Nothing a user owns is ever deleted: what --overwrite may replace, the leftovers of killed or
concurrent runs, and durability (issue 14).

A killed run is simulated by building the directories it leaves, under the names the code uses.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import sharded_ablate
from tests.ablate_helpers import make_plan, run_ablate, tree_digest

TOKEN = "0123abcd"  # the random part of a staging name: eight hex digits


def exited_process_id() -> int:
    """The id of a process that has ended, as a killed run's is."""
    process = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    return int(process.stdout)


def leftover(output: Path, process_id: int, kind: str) -> Path:
    """Where a run of `process_id` stages (`partial`) or retires (`replaced`) a directory for `output`."""
    return output.parent / f".{output.name}.{process_id}.{TOKEN}.{kind}"


def build_output(tmp_path: Path, source: Path, capsys, name: str, scale: float = 1.0) -> dict[str, str]:
    """Run the tool into tmp_path/`name`; the digest of what it wrote."""
    plan = make_plan(tmp_path, source, output=str(tmp_path / name), scale=scale)
    assert run_ablate([str(plan)], capsys).status == 0
    return tree_digest(tmp_path / name)


@pytest.mark.parametrize("plan_copy", [None, "the user's own plan"])
def test_overwrite_refuses_a_directory_this_tool_did_not_write(
    tiny_model, tmp_path: Path, capsys, plan_copy: str | None
) -> None:
    # The plan's output is the user's working directory, which holds the measurements, the plan and notes.
    work = tmp_path / "work"
    work.mkdir()
    plan = make_plan(work, tiny_model("llama"), output=str(work))
    (work / "notes.txt").write_text("mine")
    if plan_copy:
        (work / "ablation_plan.yml").write_text(plan.read_text())
    before = tree_digest(work)
    status, error, _ = run_ablate([str(plan), "--overwrite"], capsys)
    assert status == 2
    reason = (
        "its ablation_plan.yml does not list the files sharded_ablate.py wrote there"
        if plan_copy
        else "no ablation_plan.yml"
    )
    assert f"output {work}: exists and was not written by sharded_ablate.py ({reason})" in error
    assert "--overwrite only replaces a previous output of this tool" in error
    assert tree_digest(work) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["work"]


def test_overwrite_refuses_a_previous_output_holding_files_added_since(
    tiny_model, tmp_path: Path, capsys
) -> None:
    source = tiny_model("llama")
    build_output(tmp_path, source, capsys, "out")
    (tmp_path / "out" / "notes.txt").write_text("my evaluation notes")
    (tmp_path / "out" / "evaluation").mkdir()
    (tmp_path / "out" / "evaluation" / "results.json").write_text("{}")
    before = tree_digest(tmp_path / "out")
    status, error, _ = run_ablate([str(make_plan(tmp_path, source, scale=0.5)), "--overwrite"], capsys)
    assert status == 2
    assert "holds files sharded_ablate.py did not write (evaluation/results.json, notes.txt)" in error
    assert tree_digest(tmp_path / "out") == before


def test_overwrite_refuses_a_link_to_a_previous_output(tiny_model, tmp_path: Path, capsys) -> None:
    source = tiny_model("llama")
    previous = build_output(tmp_path, source, capsys, "kept")
    (tmp_path / "out").symlink_to(tmp_path / "kept")
    status, error, _ = run_ablate([str(make_plan(tmp_path, source)), "--overwrite"], capsys)
    assert status == 2 and "exists and is not a directory; --overwrite only replaces a directory" in error
    assert (tmp_path / "out").is_symlink() and tree_digest(tmp_path / "kept") == previous


def test_help_says_what_overwrite_replaces(capsys) -> None:
    with pytest.raises(SystemExit):
        sharded_ablate.build_parser().parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "only a previous output of this tool holding nothing but the files it wrote there" in help_text


def test_cleanup_removes_only_this_outputs_leftovers_of_ended_runs(
    tiny_model, tmp_path: Path, capsys
) -> None:
    ended, running = exited_process_id(), os.getpid()
    output, sibling = tmp_path / "out", tmp_path / "out.v2"
    # Another output's staging directories, of a live run and an ended one, and this output's of a live run.
    kept = [
        leftover(sibling, running, "partial"),
        leftover(sibling, ended, "partial"),
        leftover(output, running, "partial"),
    ]
    removed = leftover(output, ended, "partial")
    for directory in [*kept, removed]:
        directory.mkdir()
        (directory / "model.safetensors").write_bytes(b"being written")
    status, _, printed = run_ablate([str(make_plan(tmp_path, tiny_model("llama")))], capsys)
    assert status == 0
    assert all((directory / "model.safetensors").read_bytes() == b"being written" for directory in kept)
    assert not removed.exists()
    assert f"removed {removed}, left by an interrupted run" in printed
    assert f"kept {kept[2]}: its process {running} is still running" in printed
    assert str(kept[0]) not in printed and str(kept[1]) not in printed


@pytest.mark.parametrize("new_output_staged", [True, False])
def test_a_replacement_killed_between_its_renames_leaves_one_complete_output(
    tiny_model, tmp_path: Path, capsys, new_output_staged: bool
) -> None:
    source, output, process_id = tiny_model("llama"), tmp_path / "out", exited_process_id()
    old = build_output(tmp_path, source, capsys, "old")
    (tmp_path / "old").rename(leftover(output, process_id, "replaced"))
    if new_output_staged:  # the state a kill between the renames leaves
        new = build_output(tmp_path, source, capsys, "new", scale=0.5)
        (tmp_path / "new").rename(leftover(output, process_id, "partial"))
    status, error, printed = run_ablate([str(make_plan(tmp_path, source))], capsys)
    assert status == 2 and "already exists; pass --overwrite" in error, "it must not replace it unasked"
    staged, retired = leftover(output, process_id, "partial"), leftover(output, process_id, "replaced")
    if new_output_staged:
        assert f"moved its complete new output {staged.name} to {output}" in printed
        assert f"removed {retired}, the previous output" in printed
        assert tree_digest(output) == new
    else:
        assert f"restored the previous output {output} from {retired.name}" in printed
        assert tree_digest(output) == old
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]


def test_a_retired_old_output_is_deleted_once_the_new_one_is_in_place(
    tiny_model, tmp_path: Path, capsys
) -> None:
    # Killed after the second rename, while deleting the old output.
    source, output, process_id = tiny_model("llama"), tmp_path / "out", exited_process_id()
    build_output(tmp_path, source, capsys, "old")
    (tmp_path / "old").rename(leftover(output, process_id, "replaced"))
    build_output(tmp_path, source, capsys, "new", scale=0.5)
    (tmp_path / "new").rename(output)
    status, _, printed = run_ablate([str(make_plan(tmp_path, source, scale=0.5)), "--overwrite"], capsys)
    assert status == 0
    assert f"removed {leftover(output, process_id, 'replaced')}, the previous output" in printed
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]


def test_every_file_and_folder_of_the_output_is_synced(
    tiny_model, tmp_path: Path, capsys, synced_paths: list[Path]
) -> None:
    assert run_ablate([str(make_plan(tmp_path, tiny_model("llama")))], capsys).status == 0
    output = tmp_path / "out"
    (staging,) = {path.parent for path in synced_paths if path.suffix == ".safetensors"}
    synced_inside = {str(path.relative_to(staging)) for path in synced_paths if path.is_relative_to(staging)}
    written = {str(path.relative_to(output)) for path in output.rglob("*")}
    assert written and sorted(written - synced_inside) == []
    assert staging in synced_paths, "the staging folder itself is synced, for the names in it"
    assert synced_paths[-1] == tmp_path, "the parent is synced after the rename"
