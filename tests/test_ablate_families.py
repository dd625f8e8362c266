"""Every supported family, through transformers' own forward pass: the edited layers no longer write
the direction into the residual stream, routers no longer see it, and nothing else changed a bit."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from lib.core.loading import decoder_layers
from tests.ablate_helpers import (
    component_ratios,
    read_all_tensors,
    residual_writes,
    run_ablate,
    write_plan,
)
from tests.fixtures import ALL_FAMILIES, DEFAULT_NUM_LAYERS, HIDDEN_SIZE, MOE_FAMILIES, fuse_routed_experts
from tests.measurement_files import write_measurements

# Which measured direction each edited layer uses; layer 0 stays untouched.
LAYER_MEASUREMENTS = {1: 3, 2: 2, 3: 0}
EDITED_LAYERS = "|".join(str(layer) for layer in LAYER_MEASUREMENTS)
# Written independently of lib/ablate/architectures.py: the tensors a default plan must edit, and only those.
EXPECTED_EDITED = re.compile(
    rf".*layers\.({EDITED_LAYERS})\.("
    r"self_attn\.o_proj\.(weight|bias)"
    r"|linear_attn\.out_proj\.weight"
    r"|(mlp|feed_forward)\.down_proj\.weight"
    r"|mlp\.(experts\.\d+\.|shared_experts?\.)down_proj\.weight"
    r"|feed_forward\.shared_expert\.down_proj\.weight"
    r"|block_sparse_moe\.experts\.\d+\.w2\.weight"
    r"|block_sparse_moe\.output_linear\.weight"
    r"|(mlp|feed_forward)\.experts\.down_proj(_bias)?"
    r"|(mlp|feed_forward)\.router\.weight|mlp\.gate\.weight|block_sparse_moe\.gate\.weight"
    r"|block_sparse_moe\.router\.layer\.weight|mlp\.shared_expert_gate\.weight"
    r")"
)
ROUTER = re.compile(
    r".*layers\.(\d+)\.((mlp|feed_forward)\.router|mlp\.gate|block_sparse_moe\.gate|block_sparse_moe\.router\.layer"
    r"|mlp\.shared_expert_gate)\.weight"
)
# Checkpoint layouts transformers' save_pretrained does not write: Qwen3.5-MoE as released, with each
# layer's experts stacked into `mlp.experts.down_proj` [experts, hidden, intermediate].
STACKED_EXPERTS = "qwen3_5_moe-stacked-experts"
LAYOUT_VARIANTS = {STACKED_EXPERTS: ("qwen3_5_moe", fuse_routed_experts)}
FAMILIES = [*ALL_FAMILIES, *LAYOUT_VARIANTS]


@pytest.fixture(scope="module")
def ablated(tiny_model, tmp_path_factory):
    """Ablate each family once per module: {model_type: (source, output, measurements)}."""
    results = {}

    def make(model_type: str):
        if model_type not in results:
            work = tmp_path_factory.mktemp(f"ablate-{model_type}")
            family, rewrite = LAYOUT_VARIANTS.get(model_type, (model_type, None))
            source = tiny_model(family, randomize_norms_and_biases=True)
            if rewrite is not None:
                source = shutil.copytree(source, work / "source")
                rewrite(source)
            measurements = write_measurements(
                work / "m.pt", HIDDEN_SIZE, DEFAULT_NUM_LAYERS, seed=len(results)
            )
            plan = write_plan(
                work / "plan.yml",
                {
                    "model": str(source),
                    "measurements": str(work / "m.pt"),
                    "output": str(work / "out"),
                    "ablate": [
                        {"layer": layer, "measurement": measured}
                        for layer, measured in LAYER_MEASUREMENTS.items()
                    ],
                },
            )
            assert run_ablate([str(plan)]).status == 0
            results[model_type] = (source, work / "out", measurements)
        return results[model_type]

    return make


@pytest.mark.parametrize("model_type", FAMILIES)
def test_edited_layers_write_nothing_along_the_direction(ablated, model_type: str) -> None:
    source, output, measurements = ablated(model_type)
    original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    edited = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32).eval()
    input_ids = torch.randint(10, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    before = residual_writes(original, range(DEFAULT_NUM_LAYERS), input_ids)
    after = residual_writes(edited, range(DEFAULT_NUM_LAYERS), input_ids)
    assert torch.equal(after[0], before[0])  # layer 0 is not in the plan
    for layer, measured in LAYER_MEASUREMENTS.items():
        direction = measurements.direction(measured)
        ratio_after = component_ratios(after[layer], direction)
        ratio_before = component_ratios(before[layer], direction)
        assert ratio_after.max() <= 0.01, (layer, float(ratio_after.max()))
        assert ratio_after.mean() * 10 <= ratio_before.mean(), layer


@pytest.mark.parametrize("model_type", FAMILIES)
def test_exactly_the_planned_tensors_change(ablated, model_type: str) -> None:
    source, output, _ = ablated(model_type)
    before, after = read_all_tensors(source), read_all_tensors(output)
    assert set(after) == set(before)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    expected = {name for name in before if EXPECTED_EDITED.fullmatch(name)}
    assert expected and changed == expected
    for name in set(before) - changed:
        assert before[name].dtype == after[name].dtype
        assert before[name].view(torch.uint8).equal(after[name].view(torch.uint8))
    recorded = {
        edit["tensor"] for edit in yaml.safe_load((output / "ablation_plan.yml").read_text())["edits"]
    }
    assert recorded == expected
    index = json.loads((output / "model.safetensors.index.json").read_text())
    assert (
        index["weight_map"] == json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    )


@pytest.mark.parametrize("model_type", [*MOE_FAMILIES, STACKED_EXPERTS])
def test_routers_are_blind_to_the_direction_behind_their_norm(ablated, model_type: str) -> None:
    source, output, measurements = ablated(model_type)
    before, after = read_all_tensors(source), read_all_tensors(output)
    routers = [
        name
        for name in after
        if ROUTER.fullmatch(name) and int(ROUTER.fullmatch(name)[1]) in LAYER_MEASUREMENTS
    ]
    assert routers
    model = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float64).eval()
    seen_before = []
    for name in routers:
        layer = int(ROUTER.fullmatch(name)[1])
        # The MLP block, and so its router, reads the residual through the norm called
        # post_attention_layernorm in these families; transformers' own norm says what the router sees
        # of the direction (the gain, stored as w or as 1 + w, times the direction).
        norm = decoder_layers(model)[layer].post_attention_layernorm
        with torch.no_grad():
            seen = norm(measurements.direction(LAYER_MEASUREMENTS[layer]).double()[None])[0]
        seen = seen / seen.norm()
        assert (after[name].double() @ seen).abs().max() <= 1e-5 * after[name].double().norm()
        seen_before.append(float((before[name].double() @ seen).abs().max() / before[name].double().norm()))
    # The routers saw the direction before the edit (a one-row gate may happen to be nearly blind already).
    assert max(seen_before) >= 1e-2
