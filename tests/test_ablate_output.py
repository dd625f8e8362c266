"""The output directory: inputs of every shape, what is copied, written and refused, and crash safety."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from lib.ablate.output_guard import lock_path, output_lock
from lib.core.atomic import check_free_space
from lib.core.errors import UserError
from tests.ablate_helpers import (
    make_plan,
    read_all_tensors,
    run_ablate,
    shard_metadata,
    tree_digest,
    write_plan,
)
from tests.fixtures import DEFAULT_NUM_LAYERS, HIDDEN_SIZE, build_fixture, install_in_hub_cache
from tests.measurement_files import write_measurements

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent


def test_single_file_input_gives_a_single_file_output(tiny_model, tmp_path: Path, capsys) -> None:
    source = tiny_model("qwen2", single_file=True)
    assert run_ablate([str(make_plan(tmp_path, source))], capsys).status == 0
    output = tmp_path / "out"
    assert (output / "model.safetensors").is_file() and not (output / "model.safetensors.index.json").exists()
    before, after = read_all_tensors(source), read_all_tensors(output)
    assert {name for name in before if not torch.equal(before[name], after[name])} == {
        "model.layers.2.self_attn.o_proj.weight",
        "model.layers.2.mlp.down_proj.weight",
    }
    assert shard_metadata(output) == shard_metadata(source)
    AutoModelForCausalLM.from_pretrained(output)


def test_multi_shard_output_mirrors_the_input_and_leaves_it_untouched(
    tiny_model, tmp_path: Path, capsys
) -> None:
    source = tiny_model("llama")
    before = tree_digest(source)
    assert run_ablate([str(make_plan(tmp_path, source))], capsys).status == 0
    output = tmp_path / "out"
    assert tree_digest(source) == before
    assert shard_metadata(output) == shard_metadata(source)
    assert [path.stat().st_size for path in sorted(output.glob("*.safetensors"))] == [
        path.stat().st_size for path in sorted(source.glob("*.safetensors"))
    ]
    written = tree_digest(output)
    for name, digest in before.items():
        if not name.endswith(".safetensors"):
            assert written[name] == digest, f"{name} must be copied unchanged"
    assert {"README.md", "ablation_plan.yml"} <= set(written)
    assert oct(output.stat().st_mode & 0o777) == "0o755"
    assert not list(tmp_path.glob(".out*")), "no temporary directory or lock may remain"


def test_hub_cache_input(tiny_model, tmp_path: Path, capsys, monkeypatch) -> None:
    cache = tmp_path / "hub"
    install_in_hub_cache(tiny_model("mistral"), cache, "tiny-org/tiny-mistral")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    before = tree_digest(cache)
    assert run_ablate([str(make_plan(tmp_path, "tiny-org/tiny-mistral"))], capsys).status == 0
    assert tree_digest(cache) == before
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.model_type == "mistral"
    assert not any((tmp_path / "out").joinpath(name).is_symlink() for name in os.listdir(tmp_path / "out"))


def test_link_hard_links_only_unedited_shards(tiny_model, tmp_path: Path, capsys) -> None:
    cache = tmp_path / "hub"
    snapshot = install_in_hub_cache(tiny_model("llama"), cache, "tiny-org/tiny-llama")
    assert run_ablate([str(make_plan(tmp_path, snapshot)), "--link"], capsys).status == 0
    index = json.loads((snapshot / "model.safetensors.index.json").read_text())["weight_map"]
    edited = {index["model.layers.2.self_attn.o_proj.weight"], index["model.layers.2.mlp.down_proj.weight"]}
    for shard in set(index.values()):
        linked = os.path.samefile(snapshot / shard, tmp_path / "out" / shard)
        assert linked == (shard not in edited), shard


def test_overwrite_replaces_a_previous_output_and_its_absence_refuses(
    tiny_model, tmp_path: Path, capsys
) -> None:
    source = tiny_model("llama")
    plan = make_plan(tmp_path, source)
    assert run_ablate([str(plan)], capsys).status == 0
    previous = tree_digest(tmp_path / "out")
    status, error, _ = run_ablate([str(plan)], capsys)
    assert status == 2 and "already exists; pass --overwrite" in error
    assert tree_digest(tmp_path / "out") == previous
    make_plan(tmp_path, source, scale=0.5)
    assert run_ablate([str(plan), "--overwrite"], capsys).status == 0
    assert yaml.safe_load((tmp_path / "out" / "ablation_plan.yml").read_text())["global_scale"] == 0.5
    assert sorted(path.name for path in tmp_path.iterdir()) == ["m.pt", "out", "plan.yml"]


@pytest.mark.parametrize("where", ["input itself", "inside input", "overwrite a parent of input"])
def test_output_must_stay_clear_of_the_input(tiny_model, tmp_path: Path, capsys, where: str) -> None:
    source = tmp_path / "models" / "llama"
    shutil.copytree(tiny_model("llama"), source)
    before = tree_digest(tmp_path / "models")
    output, extra = {
        "input itself": (source, []),
        "inside input": (source / "ablated", []),
        "overwrite a parent of input": (tmp_path / "models", ["--overwrite"]),
    }[where]
    write_measurements(tmp_path / "m.pt", HIDDEN_SIZE, DEFAULT_NUM_LAYERS)
    plan = write_plan(
        tmp_path / "plan.yml",
        {
            "model": str(source),
            "measurements": str(tmp_path / "m.pt"),
            "output": str(output),
            "ablate": [{"layer": 1}],
        },
    )
    status, error, _ = run_ablate([str(plan), *extra], capsys)
    assert status == 2 and "input model directory" in error
    assert tree_digest(tmp_path / "models") == before


def test_a_second_concurrent_run_is_refused_and_a_stale_lock_is_taken_over(
    tiny_model, tmp_path: Path, capsys
) -> None:
    plan = make_plan(tmp_path, tiny_model("llama"))
    with output_lock(tmp_path / "out"):
        status, error, _ = run_ablate([str(plan)], capsys)
    assert status == 2 and "another run" in error and f"pid {os.getpid()}" in error
    assert not (tmp_path / "out").exists()
    lock_path(tmp_path / "out").write_text("pid 999999999\n")  # left behind by a run that died
    assert run_ablate([str(plan)], capsys).status == 0
    assert not lock_path(tmp_path / "out").exists()


def test_free_space_is_checked_before_writing(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"needs 1000000000.00 GB plus a 67.1 MB safety margin but only"):
        check_free_space(tmp_path / "out", 10**18)
    check_free_space(tmp_path / "out", 1)


@pytest.mark.parametrize("model_type", ["gemma3_text", "gemma3"])
def test_tied_embeddings_are_untied_explicitly(tiny_model, tmp_path: Path, capsys, model_type: str) -> None:
    source = tiny_model(model_type)
    measurements = write_measurements(tmp_path / "m.pt", HIDDEN_SIZE, DEFAULT_NUM_LAYERS)
    plan = make_plan(tmp_path, source, embeddings={"measurement": 3})
    assert run_ablate([str(plan)], capsys).status == 0
    output = tmp_path / "out"
    config = json.loads((output / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert config.get("text_config", {}).get("tie_word_embeddings", False) is False
    original = AutoModelForCausalLM.from_pretrained(source)
    edited = AutoModelForCausalLM.from_pretrained(output)
    original_embedding = original.get_input_embeddings().weight.detach().double()
    embedding = edited.get_input_embeddings().weight.detach().double()
    direction = measurements.direction(3).double()
    assert (embedding @ direction).abs().max() <= 1e-5 * embedding.norm(dim=1).max()
    assert (original_embedding @ direction).abs().max() > 1e-2 * original_embedding.norm(dim=1).max()
    assert edited.get_output_embeddings().weight.detach().double().equal(original_embedding)
    assert "untouched `lm_head`" in (output / "README.md").read_text()


def test_untied_embeddings_leave_the_head_and_config_alone(tiny_model, tmp_path: Path, capsys) -> None:
    source = tiny_model("llama")
    plan = make_plan(tmp_path, source, embeddings={"measurement": 1.5, "scale": 0.5})
    assert run_ablate([str(plan)], capsys).status == 0
    before, after = read_all_tensors(source), read_all_tensors(tmp_path / "out")
    assert after["lm_head.weight"].equal(before["lm_head.weight"])
    assert not after["model.embed_tokens.weight"].equal(before["model.embed_tokens.weight"])
    assert (tmp_path / "out" / "config.json").read_bytes() == (source / "config.json").read_bytes()


def test_other_weight_formats_are_not_copied_and_the_card_keeps_the_original(
    tiny_model, tmp_path: Path, capsys
) -> None:
    source = tmp_path / "model"
    shutil.copytree(tiny_model("llama"), source)
    (source / "original").mkdir()
    (source / "original" / "model.safetensors").write_bytes(b"unedited weights")
    (source / "pytorch_model.bin").write_bytes(b"unedited weights")
    (source / "extra").mkdir()
    (source / "extra" / "notes.txt").write_text("kept")
    (source / "README.md").write_text("---\nlicense: apache-2.0\n---\n# Tiny\nThe original card.\n")
    status, _, output_text = run_ablate([str(make_plan(tmp_path, source))], capsys)
    assert status == 0
    output = tmp_path / "out"
    assert not (output / "original").exists() and not (output / "pytorch_model.bin").exists()
    assert (output / "extra" / "notes.txt").read_text() == "kept"
    card = (output / "README.md").read_text()
    assert card.startswith("---\nlicense: apache-2.0\n---\n") and "## Original model card" in card
    assert "The original card." in card and "`original`" in card
    assert "not copied (weights in another format): original" in output_text


@pytest.mark.slow  # sharded_ablate.py as its own process: seconds; in-process failing runs are in the fast tier
def test_a_failing_run_exits_2_with_one_line_from_a_real_process(tiny_model, tmp_path: Path) -> None:
    plan = make_plan(tmp_path, tiny_model("llama"), ablate=[{"layer": 1, "sparsity": 0}])
    result = subprocess.run(
        [sys.executable, "sharded_ablate.py", str(plan)],
        cwd=REPOSITORY_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # a 150 MB model and two sharded_ablate.py processes
def test_killing_the_process_mid_run_leaves_nothing_under_the_final_name(tmp_path: Path) -> None:
    # A large embedding (about 150 MB, edited) keeps the run writing for a while after it starts.
    source = build_fixture(
        "llama", tmp_path / "big", num_hidden_layers=DEFAULT_NUM_LAYERS, vocab_size=600_000
    )
    plan = make_plan(tmp_path, source, embeddings={"measurement": 1})
    process = subprocess.Popen(
        [sys.executable, "sharded_ablate.py", str(plan)],
        cwd=REPOSITORY_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            partial = [path for path in tmp_path.glob(".out.*.partial") if any(path.glob("*.safetensors"))]
            if partial or process.poll() is not None:
                break
            time.sleep(0.001)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert partial, "the run must have been caught while writing"
    assert not (tmp_path / "out").exists()
    # The next run recognises the stale lock and temporary directory, cleans them up and completes.
    result = subprocess.run(
        [sys.executable, "sharded_ablate.py", str(plan)],
        cwd=REPOSITORY_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "left by an interrupted run" in result.stdout
    assert (tmp_path / "out" / "config.json").is_file()
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(".")) == []
