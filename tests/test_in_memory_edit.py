"""Previews and search trials edit the loaded model in memory: for every family, the result must equal
the model sharded_ablate.py writes, loaded back by transformers, and the undo must restore every bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lib.ablate.checkpoint import open_checkpoint
from lib.ablate.in_memory_edit import InMemoryEditor, edited_in_memory
from lib.ablate.plan import load_plan
from lib.ablate.resolution import resolve
from lib.core.errors import UserError
from lib.core.loading import ModelLoadOptions, load_model
from lib.measure.measurements import load_measurements
from tests.ablate_helpers import run_ablate, write_plan
from tests.fixtures import ALL_FAMILIES, DEFAULT_NUM_LAYERS, HIDDEN_SIZE
from tests.measurement_files import write_measurements

CPU_AUTO = ModelLoadOptions(dtype="auto", device_map="cpu")


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def differing(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> list[str]:
    assert first.keys() == second.keys()
    return [name for name in first if not torch.equal(first[name], second[name])]


def plan_for(model_type: str, source: Path, work: Path) -> Path:
    """Several layers, a list measurement, both projections, norm-preserving writers, and the embedding."""
    entries = [
        {"layer": "1-2", "measurement": 2, "projected": "both", "scale": 1.3},
        {"layer": 3, "measurement": [1, 3], "norm_preserve": True, "projected": "measurement"},
    ]
    return write_plan(
        work / "plan.yml",
        {
            "model": str(source),
            "measurements": str(work / "m.pt"),
            "output": str(work / "out"),
            "ablate": entries,
            "embeddings": {"measurement": 1, "scale": 0.5},
        },
    )


@pytest.mark.parametrize("model_type", ALL_FAMILIES)
def test_edit_in_memory_equals_the_written_model_and_undo_restores_the_original(
    model_type: str, tiny_model, tmp_path: Path
) -> None:
    source = tiny_model(model_type, randomize_norms_and_biases=True)
    write_measurements(tmp_path / "m.pt", HIDDEN_SIZE, DEFAULT_NUM_LAYERS, seed=7)
    plan_path = plan_for(model_type, source, tmp_path)
    assert run_ablate([str(plan_path)]).status == 0
    written = state(load_model(tmp_path / "out", CPU_AUTO, "written"))

    model = load_model(source, CPU_AUTO, "original")
    original = state(model)
    checkpoint = open_checkpoint(source)
    resolution = resolve(load_plan(plan_path), checkpoint, load_measurements(tmp_path / "m.pt"))
    editor = InMemoryEditor(model, checkpoint)
    with edited_in_memory(editor, resolution):
        edited = state(model)
    assert differing(edited, written) == []
    assert len(differing(original, edited)) >= 4  # the edit did something: attention, MLP, embedding at least
    assert differing(state(model), original) == []
    if model.config.get_text_config().tie_word_embeddings:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_a_tensor_the_loaded_model_does_not_hold_is_a_clear_error(tiny_model, tmp_path: Path) -> None:
    source = tiny_model("llama")
    write_measurements(tmp_path / "m.pt", HIDDEN_SIZE, DEFAULT_NUM_LAYERS)
    plan_path = write_plan(
        tmp_path / "plan.yml",
        {
            "model": str(source),
            "measurements": str(tmp_path / "m.pt"),
            "output": str(tmp_path / "out"),
            "ablate": [{"layer": 1}],
        },
    )
    model = load_model(source, CPU_AUTO, "original")
    checkpoint = open_checkpoint(source)
    resolution = resolve(load_plan(plan_path), checkpoint, load_measurements(tmp_path / "m.pt"))
    model.model.layers[1].self_attn.o_proj = torch.nn.Identity()  # as if transformers had renamed it
    before = state(model)
    with pytest.raises(
        UserError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight: no parameter of the loaded"
    ):
        InMemoryEditor(model, checkpoint).apply(resolution)
    assert differing(state(model), before) == []  # nothing was edited before the error
