"""The shared foundation: fixtures load in transformers, measurement files round-trip and fail clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lib.ablate.architectures import SUPPORTED_MODEL_TYPES
from lib.core.errors import UserError, writing
from lib.measure.measurements import load_measurements, save_measurements
from tests.cli_helpers import error_line
from tests.filesystems import DEV_FULL, needs_dev_full
from tests.fixtures import ALL_FAMILIES
from tests.measurement_files import random_measurements


def test_every_supported_family_has_a_fixture() -> None:
    """The family tests run over the fixtures and take their architecture facts from lib/ablate/architectures.py,
    so a new family is one table entry and one fixture config."""
    assert list(SUPPORTED_MODEL_TYPES) == ALL_FAMILIES


@pytest.mark.parametrize("model_type", ALL_FAMILIES)
def test_fixture_is_a_loadable_multi_shard_checkpoint(tiny_model, model_type: str) -> None:
    directory = tiny_model(model_type)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    input_ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    assert input_ids[0].tolist().count(tokenizer.bos_token_id) == 1
    hidden_states = model(input_ids, output_hidden_states=True).hidden_states
    assert len(hidden_states) == model.config.get_text_config().num_hidden_layers + 1


def test_single_file_fixture(tiny_model) -> None:
    directory = tiny_model("llama", single_file=True)
    assert (directory / "model.safetensors").is_file()
    assert not (directory / "model.safetensors.index.json").exists()


def test_measurement_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    save_measurements(random_measurements(hidden_size=8, num_layers=2), path)
    loaded = load_measurements(path)
    assert loaded.num_layers == 2 and sorted(loaded.layers) == [0, 1, 2]
    assert torch.allclose(loaded.direction(1).norm(), torch.tensor(1.0))
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_llm_abliteration_style_file_without_refusenorm(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    torch.save(
        {"layers": 1, "harmful_0": torch.ones(4), "harmless_0": torch.zeros(4), "refuse_0": torch.ones(4)},
        path,
    )
    assert torch.allclose(load_measurements(path).direction(0), torch.full((4,), 0.5))


@pytest.mark.parametrize(
    "content, message",
    [
        ({"layers": 1, "refuse_0": torch.tensor([float("nan"), 1.0])}, "NaN"),
        ({"layers": 1, "refuse_0": torch.zeros(3)}, "zero"),
        ({"refuse_0": torch.ones(3)}, "'layers'"),
        ({"layers": 1}, "no per-layer"),
    ],
)
def test_bad_measurement_files_name_the_problem(tmp_path: Path, content: dict, message: str) -> None:
    path = tmp_path / "bad.pt"
    torch.save(content, path)
    with pytest.raises(UserError, match=message):
        load_measurements(path)


def test_pickle_with_arbitrary_objects_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"layers": 1, "refuse_0": torch.ones(2), "payload": Path("/")}, path)
    with pytest.raises(UserError, match="not a measurement file"):
        load_measurements(path)


def test_model_resolves_from_local_directory_and_hub_cache(tiny_model, tmp_path: Path, monkeypatch) -> None:
    from lib.core.model_files import resolve_model_directory, weight_files
    from tests.fixtures import install_in_hub_cache

    source = tiny_model("llama")
    snapshot = install_in_hub_cache(source, tmp_path / "cache", "acme/tiny-llama")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert resolve_model_directory("acme/tiny-llama") == snapshot
    assert len(weight_files(snapshot)) == len(weight_files(source)) > 1
    for bad in ["acme/not-cached", str(tmp_path / "missing"), str(source / "config.json")]:
        with pytest.raises(UserError, match="--model"):
            resolve_model_directory(bad)


@needs_dev_full
def test_a_full_disk_is_one_line_naming_the_file_being_written(capsys) -> None:
    def write_to_a_full_disk(argv) -> None:
        with writing(DEV_FULL):
            DEV_FULL.write_text("x")

    line = error_line(capsys, write_to_a_full_disk, [])
    assert line == (
        f"error: {DEV_FULL}: no space left on device while writing; free some space or write elsewhere, "
        "then run again"
    )
    # A write that no caller attributed to a file still ends in one line, without a traceback.
    unattributed = error_line(capsys, lambda argv: DEV_FULL.write_text("x"), [])
    assert unattributed.startswith("error: no space left on device while writing")
