"""Original GPT-OSS checkpoints: MXFP4 experts are dequantised as transformers does, then edited,
and the output loads in transformers with the expected edits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from lib.ablate import mxfp4
from tests.ablate_helpers import (
    component_ratios,
    read_all_tensors,
    residual_writes,
    run_ablate,
    write_plan,
)
from tests.fixtures import (
    DEFAULT_NUM_LAYERS,
    HIDDEN_SIZE,
    MXFP4_EXPERT_TENSORS,
    PREQUANTIZED_FORMATS,
    quantize_mxfp4,
)
from tests.measurement_files import write_measurements

EDITED_LAYERS = {1: 2, 3: 0}


def build_mxfp4_checkpoint(bf16_directory: Path, directory: Path) -> Path:
    """Re-pack a GPT-OSS fixture the way openai/gpt-oss-* is published: MXFP4 experts + quantization_config."""
    shutil.copytree(bf16_directory, directory)
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(directory / shard, framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
            metadata = handle.metadata()
        for name in [name for name in tensors if name.endswith(MXFP4_EXPERT_TENSORS)]:
            blocks, scales = quantize_mxfp4(tensors.pop(name))
            tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = blocks, scales
            del index["weight_map"][name]
            index["weight_map"][f"{name}_blocks"] = index["weight_map"][f"{name}_scales"] = shard
        save_file(tensors, directory / shard, metadata=metadata)
    index_path.write_text(json.dumps(index, indent=2))
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = PREQUANTIZED_FORMATS["mxfp4"][1]  # the original release's
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


@pytest.fixture(scope="module")
def mxfp4_model(tiny_model, tmp_path_factory) -> Path:
    source = tiny_model("gpt_oss", randomize_norms_and_biases=True)
    return build_mxfp4_checkpoint(source, tmp_path_factory.mktemp("gpt-oss-mxfp4") / "model")


def test_dequantisation_matches_transformers() -> None:
    generator = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 8, 2, 16), dtype=torch.uint8, generator=generator)
    scales = torch.randint(110, 140, (3, 8, 2), dtype=torch.uint8, generator=generator)
    expected = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
    assert mxfp4.dequantize(blocks, scales).view(torch.int16).equal(expected.view(torch.int16))


def test_the_fixture_is_packed_like_the_release_and_loads(mxfp4_model: Path) -> None:
    names = set(json.loads((mxfp4_model / "model.safetensors.index.json").read_text())["weight_map"])
    assert (
        "model.layers.0.mlp.experts.down_proj_blocks" in names
        and "model.layers.0.mlp.experts.down_proj" not in names
    )
    model = AutoModelForCausalLM.from_pretrained(mxfp4_model, dtype=torch.bfloat16)
    blocks, scales = (
        read_all_tensors(mxfp4_model)[f"model.layers.0.mlp.experts.down_proj{suffix}"]
        for suffix in ("_blocks", "_scales")
    )
    assert model.model.layers[0].mlp.experts.down_proj.detach().equal(mxfp4.dequantize(blocks, scales))


def test_mxfp4_checkpoint_is_ablated_and_loads_dequantised(mxfp4_model: Path, tmp_path: Path) -> None:
    measurements = write_measurements(tmp_path / "m.pt", HIDDEN_SIZE, DEFAULT_NUM_LAYERS)
    plan = write_plan(
        tmp_path / "plan.yml",
        {
            "model": str(mxfp4_model),
            "measurements": str(tmp_path / "m.pt"),
            "output": str(tmp_path / "out"),
            "ablate": [
                {"layer": layer, "measurement": measured} for layer, measured in EDITED_LAYERS.items()
            ],
        },
    )
    assert run_ablate([str(plan)]).status == 0
    output = tmp_path / "out"
    config = json.loads((output / "config.json").read_text())
    assert "quantization_config" not in config
    written = read_all_tensors(output)
    assert not [name for name in written if name.endswith(("_blocks", "_scales"))]

    original = AutoModelForCausalLM.from_pretrained(mxfp4_model, dtype=torch.bfloat16).eval()
    edited = AutoModelForCausalLM.from_pretrained(output, dtype=torch.bfloat16).eval()
    for layer in range(DEFAULT_NUM_LAYERS):
        for name in ("down_proj", "gate_up_proj"):
            before = getattr(original.model.layers[layer].mlp.experts, name).detach()
            after = getattr(edited.model.layers[layer].mlp.experts, name).detach()
            assert after.equal(before) != (layer in EDITED_LAYERS and name == "down_proj"), (layer, name)

    original, edited = original.float(), edited.float()
    input_ids = torch.randint(10, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    before = residual_writes(original, list(EDITED_LAYERS), input_ids)
    after = residual_writes(edited, list(EDITED_LAYERS), input_ids)
    assert set(after) == set(EDITED_LAYERS)
    for layer, writes in after.items():
        direction = measurements.direction(EDITED_LAYERS[layer])
        # bfloat16 weights: the residue is rounding noise, well under the 1% bound.
        assert component_ratios(writes, direction).max() <= 0.01, layer
        assert (
            component_ratios(writes, direction).mean() * 10
            <= component_ratios(before[layer], direction).mean()
        )
