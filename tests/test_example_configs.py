"""The example plans in configs/: each is a valid plan as written, and resolves (the `--dry-run` logic)
against a tiny model of its family built with the real model's layer count, editing exactly the
layers it names and every residual writer and reader its family has there.

The tiny models keep the real layer count but not the real widths or expert counts: a plan names
layers and components, never sizes, so a plan that names a layer or a tensor the family lacks fails
here as it would on the real checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig

import sharded_ablate
from lib.ablate.architectures import FAMILIES
from lib.ablate.checkpoint import open_checkpoint
from lib.ablate.plan import Plan, load_plan
from lib.ablate.resolution import Resolution, resolve
from lib.measure.measurements import load_measurements
from tests.fixtures import HIDDEN_SIZE, build_fixture, build_prequantized_fixture, fuse_routed_experts
from tests.measurement_files import write_measurements

CONFIG_DIRECTORY = Path(__file__).resolve().parent.parent / "configs"
CONFIG_FILES = sorted(CONFIG_DIRECTORY.glob("*.yml"))


@dataclass(frozen=True)
class RealModel:
    """What a plan depends on in the real model's config.json and checkpoint."""

    model_type: str
    num_hidden_layers: int
    first_dense_layers: int = 0  # these first layers have the dense tensors (a dense MLP, no router)
    packed_format: str | None = None  # the release's pre-quantised format (build_prequantized_fixture)
    # DeepSeek-V3 and GLM-4.5 store their multi-token-prediction module as one more layer after the
    # last decoder layer (`model.layers.61.*`, `model.layers.46.*`); transformers ignores it, and so
    # must a plan's resolution.
    stores_prediction_layer: bool = False
    # config.json values of the release that lay the fixture's layers out as the real model's (which
    # layers are dense, which tensors have biases), as (key, value) pairs; a tuple is written as a list.
    config_overrides: tuple[tuple[str, Any], ...] = ()
    # Qwen3.5-MoE releases store each layer's routed experts as two stacked tensors (as transformers 5
    # holds them in memory), where transformers' save_pretrained writes one tensor per expert.
    stores_fused_experts: bool = False

    def fixture_options(self) -> dict[str, Any]:
        return {
            key: list(value) if isinstance(value, tuple) else value for key, value in self.config_overrides
        }


# One entry per file in configs/, from the released config.json of each model.
REAL_MODELS: dict[str, RealModel] = {
    "gpt-oss-20b-bf16.yml": RealModel("gpt_oss", 24),
    "gpt-oss-20b-mxfp4.yml": RealModel("gpt_oss", 24, packed_format="mxfp4"),
    "qwen3-30b-a3b.yml": RealModel("qwen3_moe", 48),
    "qwen1.5-moe-a2.7b-chat.yml": RealModel("qwen2_moe", 24),
    "qwen2.5-7b-instruct.yml": RealModel("qwen2", 28),
    "qwen3-8b.yml": RealModel("qwen3", 36),
    "llama-3.1-8b-instruct.yml": RealModel("llama", 32),
    "mistral-7b-instruct-v0.3.yml": RealModel("mistral", 32),
    "gemma-2-9b-it.yml": RealModel("gemma2", 42),
    "gemma-3-1b-it.yml": RealModel("gemma3_text", 26),
    "gemma-3-12b-it.yml": RealModel("gemma3", 48),
    "mixtral-8x7b-instruct.yml": RealModel("mixtral", 32),
    "deepseek-v2-lite-chat.yml": RealModel(
        "deepseek_v2", 27, first_dense_layers=1, config_overrides=(("first_k_dense_replace", 1),)
    ),
    "deepseek-v3-bf16.yml": RealModel(
        "deepseek_v3",
        61,
        first_dense_layers=3,
        stores_prediction_layer=True,
        config_overrides=(("first_k_dense_replace", 3),),
    ),
    # Scout has routed experts in every layer (`interleave_moe_layer_step: 1`; the fixture's is 2).
    "llama-4-scout-17b-16e-instruct.yml": RealModel(
        "llama4", 48, config_overrides=(("interleave_moe_layer_step", 1),)
    ),
    "llama-4-scout-17b-16e-instruct-text.yml": RealModel(
        "llama4_text", 48, config_overrides=(("interleave_moe_layer_step", 1),)
    ),
    # Qwen3-Next and Qwen3.5 keep the fixture's linear / full attention pattern (the releases have
    # three linear attention layers per full one): expected_edits reads each layer's kind from it.
    "qwen3-next-80b-a3b-instruct.yml": RealModel(
        "qwen3_next", 48, config_overrides=(("mlp_only_layers", ()),)
    ),
    "qwen3.5-27b.yml": RealModel("qwen3_5", 64),
    "qwen3.5-27b-text.yml": RealModel("qwen3_5_text", 64),
    "qwen3.5-35b-a3b.yml": RealModel("qwen3_5_moe", 40, stores_fused_experts=True),
    "qwen3.5-35b-a3b-text.yml": RealModel("qwen3_5_moe_text", 40),
    "glm-4.5-air.yml": RealModel(
        "glm4_moe",
        46,
        first_dense_layers=1,
        stores_prediction_layer=True,
        config_overrides=(("first_k_dense_replace", 1),),
    ),
    "olmo-2-1124-7b-instruct.yml": RealModel("olmo2", 32),
    "exaone-4.0-32b.yml": RealModel("exaone4", 64),
    "phi-4-mini-instruct.yml": RealModel("phi3", 32),
    "command-r7b-12-2024.yml": RealModel("cohere2", 32),
    "granite-3.1-3b-a800m-instruct.yml": RealModel("granitemoe", 32),
    "smollm3-3b.yml": RealModel("smollm3", 36),
    # The fixture gives o_proj a bias (`attention_out_bias`); the release has none.
    "seed-oss-36b-instruct.yml": RealModel("seed_oss", 64, config_overrides=(("attention_out_bias", False),)),
    "ernie-4.5-21b-a3b-pt.yml": RealModel(
        "ernie4_5_moe",
        28,
        first_dense_layers=1,
        config_overrides=(("moe_layer_start_index", 1), ("moe_layer_end_index", 27)),
    ),
    "minimax-m2-bf16.yml": RealModel("minimax_m2", 62),
}


@dataclass(frozen=True)
class FamilyTensors:
    """The tensors a full plan edits in one layer, by component, as the released checkpoints name them.

    Written from the checkpoints, independently of lib/ablate/architectures.py. `{expert}` stands for every
    routed expert; `dense_layer` applies to the first `first_dense_layers` layers of a MoE model;
    `by_layer_type` replaces components in the layers whose entry in config.json's `layer_types` names
    that kind (hybrid models: linear attention layers write through another projection).
    """

    prefix: str
    layer: dict[str, tuple[str, ...]]
    biases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    expert_count_key: str | None = None
    dense_layer: dict[str, tuple[str, ...]] = field(default_factory=dict)
    by_layer_type: dict[str, dict[str, tuple[str, ...]]] = field(default_factory=dict)


_ATTENTION = {"attention_output": ("self_attn.o_proj.weight",)}
_DENSE_LAYER = {**_ATTENTION, "mlp_output": ("mlp.down_proj.weight",)}
_DEEPSEEK = FamilyTensors(
    "model.",
    {
        **_ATTENTION,
        "mlp_output": ("mlp.experts.{expert}.down_proj.weight",),
        "shared_expert_output": ("mlp.shared_experts.down_proj.weight",),
        "router": ("mlp.gate.weight",),
    },
    expert_count_key="n_routed_experts",
    dense_layer=_DENSE_LAYER,
)
_LLAMA4_LAYER = {
    **_ATTENTION,
    "mlp_output": ("feed_forward.experts.down_proj",),  # all experts fused, [experts, intermediate, hidden]
    "shared_expert_output": ("feed_forward.shared_expert.down_proj.weight",),
    "router": ("feed_forward.router.weight",),
}
# Qwen3-Next / Qwen3.5: Gated DeltaNet layers have no self_attn; their output projection writes instead.
_LINEAR_ATTENTION = {"linear_attention": {"attention_output": ("linear_attn.out_proj.weight",)}}
_QWEN_HYBRID_MOE_LAYER = {
    **_ATTENTION,
    "mlp_output": ("mlp.experts.{expert}.down_proj.weight",),
    "shared_expert_output": ("mlp.shared_expert.down_proj.weight",),
    "router": ("mlp.gate.weight", "mlp.shared_expert_gate.weight"),
}
EXPECTED_TENSORS: dict[str, FamilyTensors] = {
    **{dense: FamilyTensors("model.", _DENSE_LAYER) for dense in ("llama", "mistral", "qwen2", "qwen3")},
    "gemma2": FamilyTensors("model.", _DENSE_LAYER),
    "gemma3_text": FamilyTensors("model.", _DENSE_LAYER),
    "gemma3": FamilyTensors("language_model.model.", _DENSE_LAYER),
    "mixtral": FamilyTensors(
        "model.",
        {
            **_ATTENTION,
            "mlp_output": ("block_sparse_moe.experts.{expert}.w2.weight",),
            "router": ("block_sparse_moe.gate.weight",),
        },
        expert_count_key="num_local_experts",
    ),
    "qwen3_moe": FamilyTensors(
        "model.",
        {
            **_ATTENTION,
            "mlp_output": ("mlp.experts.{expert}.down_proj.weight",),
            "router": ("mlp.gate.weight",),
        },
        expert_count_key="num_experts",
    ),
    "qwen2_moe": FamilyTensors(
        "model.",
        {
            **_ATTENTION,
            "mlp_output": ("mlp.experts.{expert}.down_proj.weight",),
            "shared_expert_output": ("mlp.shared_expert.down_proj.weight",),
            "router": ("mlp.gate.weight", "mlp.shared_expert_gate.weight"),
        },
        expert_count_key="num_experts",
    ),
    "deepseek_v2": _DEEPSEEK,
    "deepseek_v3": _DEEPSEEK,
    "gpt_oss": FamilyTensors(
        "model.",
        {**_ATTENTION, "mlp_output": ("mlp.experts.down_proj",), "router": ("mlp.router.weight",)},
        biases={
            "attention_output": ("self_attn.o_proj.bias",),
            "mlp_output": ("mlp.experts.down_proj_bias",),
        },
    ),
    "llama4_text": FamilyTensors("model.", _LLAMA4_LAYER),
    "llama4": FamilyTensors("language_model.model.", _LLAMA4_LAYER),
    "qwen3_next": FamilyTensors(
        "model.", _QWEN_HYBRID_MOE_LAYER, expert_count_key="num_experts", by_layer_type=_LINEAR_ATTENTION
    ),
    "qwen3_5_text": FamilyTensors("model.", _DENSE_LAYER, by_layer_type=_LINEAR_ATTENTION),
    "qwen3_5": FamilyTensors("model.language_model.", _DENSE_LAYER, by_layer_type=_LINEAR_ATTENTION),
    # As transformers 5 saves a text-only Qwen3.5-MoE: one tensor per expert.
    "qwen3_5_moe_text": FamilyTensors(
        "model.", _QWEN_HYBRID_MOE_LAYER, expert_count_key="num_experts", by_layer_type=_LINEAR_ATTENTION
    ),
    # As released: each layer's experts stacked, `mlp.experts.down_proj` [experts, hidden, intermediate].
    "qwen3_5_moe": FamilyTensors(
        "model.language_model.",
        {**_QWEN_HYBRID_MOE_LAYER, "mlp_output": ("mlp.experts.down_proj",)},
        by_layer_type=_LINEAR_ATTENTION,
    ),
    "glm4_moe": _DEEPSEEK,
    "ernie4_5_moe": replace(_DEEPSEEK, expert_count_key="moe_num_experts"),
    "minimax_m2": FamilyTensors(
        "model.",
        {
            **_ATTENTION,
            "mlp_output": ("block_sparse_moe.experts.{expert}.w2.weight",),
            "router": ("block_sparse_moe.gate.weight",),
        },
        expert_count_key="num_local_experts",
    ),
    # Experts stacked as nn.Linear weights: output_linear [experts, hidden, intermediate].
    "granitemoe": FamilyTensors(
        "model.",
        {
            **_ATTENTION,
            "mlp_output": ("block_sparse_moe.output_linear.weight",),
            "router": ("block_sparse_moe.router.layer.weight",),
        },
    ),
    **{
        dense: FamilyTensors("model.", _DENSE_LAYER)
        for dense in ("olmo2", "exaone4", "phi3", "cohere2", "smollm3", "seed_oss")
    },
}


def real_model_of(config: Path) -> RealModel:
    real = REAL_MODELS.get(config.name)
    assert real is not None, (
        f"{config.name}: add the real model's model_type and num_hidden_layers to "
        "REAL_MODELS in tests/test_example_configs.py"
    )
    return real


@pytest.fixture(scope="module")
def example_model(tmp_path_factory: pytest.TempPathFactory):
    """`make(real) -> (model directory, measurement file)`: a tiny model of the family with the real
    layer count, and random measurements of its size; built once per RealModel."""
    built: dict[RealModel, tuple[Path, Path]] = {}

    def make(real: RealModel) -> tuple[Path, Path]:
        if real not in built:
            options = real.fixture_options()
            directory = tmp_path_factory.mktemp(real.model_type)
            if real.packed_format:
                model = build_prequantized_fixture(
                    real.model_type,
                    directory,
                    real.packed_format,
                    num_hidden_layers=real.num_hidden_layers,
                    **options,
                )
            else:
                model = build_fixture(
                    real.model_type, directory, num_hidden_layers=real.num_hidden_layers, **options
                )
            if real.stores_prediction_layer:
                add_prediction_layer(model, real.num_hidden_layers)
            if real.stores_fused_experts:
                fuse_routed_experts(model)
            measurements = tmp_path_factory.mktemp("measurements") / "m.pt"
            write_measurements(
                measurements,
                HIDDEN_SIZE,
                real.num_hidden_layers,
                seed=len(built),
                like_measure=True,
                model="example-config fixture",
            )
            built[real] = (model, measurements)
        return built[real]

    return make


def add_prediction_layer(model: Path, layer: int) -> None:
    """Store a copy of the last decoder layer's tensors as layer `layer`, plus the prediction module's
    own projection, in a shard of their own, as DeepSeek-V3's release stores its multi-token-prediction
    module."""
    index_path = model / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    last, extra = f"model.layers.{layer - 1}.", f"model.layers.{layer}."
    tensors = {}
    for name, file_name in index["weight_map"].items():
        if name.startswith(last):
            with safe_open(model / file_name, framework="pt") as handle:
                tensors[extra + name.removeprefix(last)] = handle.get_tensor(name)
    tensors[f"{extra}eh_proj.weight"] = torch.zeros(HIDDEN_SIZE, 2 * HIDDEN_SIZE)
    save_file(tensors, model / "model-prediction-layer.safetensors", metadata={"format": "pt"})
    index["weight_map"].update(dict.fromkeys(tensors, "model-prediction-layer.safetensors"))
    index_path.write_text(json.dumps(index, indent=2))


def plan_for_fixture(config: Path, model: Path, measurements: Path, work: Path) -> Path:
    """The example plan with only `model`, `measurements` and `output` pointed at the fixture."""
    document = yaml.safe_load(config.read_text())
    document.update(model=str(model), measurements=str(measurements), output=str(work / "ablated"))
    rewritten = work / config.name
    rewritten.write_text(yaml.safe_dump(document, sort_keys=False))
    return rewritten


def planned_layers(plan: Plan) -> set[int]:
    return {layer for entry in plan.entries for layers in entry.layer_ranges for layer in layers}


def expected_edits(plan: Plan, real: RealModel, model: Path) -> set[str]:
    tensors = EXPECTED_TENSORS[real.model_type]
    # Through transformers' config class: its attribute map accepts the key as released (Qwen3-MoE's
    # `num_experts`) and as transformers 5 saves it (`num_local_experts`).
    config = AutoConfig.from_pretrained(model).get_text_config()
    experts = range(getattr(config, tensors.expert_count_key)) if tensors.expert_count_key else range(0)
    layer_types = getattr(config, "layer_types", None) or []
    names = set()
    for entry in plan.entries:
        components = entry.options.components
        for layer in (layer for layers in entry.layer_ranges for layer in layers):
            by_component = tensors.dense_layer if layer < real.first_dense_layers else tensors.layer
            if layer < len(layer_types):
                by_component = {**by_component, **tensors.by_layer_type.get(layer_types[layer], {})}
            for component in components & set(by_component):
                suffixes = by_component[component]
                if "biases" in components:  # the biases of the selected writers
                    suffixes += tensors.biases.get(component, ())
                for suffix in suffixes:
                    names.update(
                        f"{tensors.prefix}layers.{layer}.{suffix.format(expert=expert)}"
                        for expert in (experts if "{expert}" in suffix else [None])
                    )
    return names


@pytest.mark.parametrize("config", CONFIG_FILES, ids=lambda path: path.name)
def test_example_plan_is_valid_as_written(config: Path) -> None:
    real = real_model_of(config)
    plan = load_plan(config)
    text = config.read_text()
    assert plan.measurements.suffix == ".pt"
    output = plan.output.absolute()
    assert Path(plan.model).absolute() not in (output, *output.parents), (
        "the output must lie outside the model"
    )
    assert "analyze.py" in text, "the comments must say what to change after reading analyze.py's output"
    layers = planned_layers(plan)
    # A starting range in the middle-to-late layers: past the first quarter, reaching the last quarter.
    assert min(layers) >= real.num_hidden_layers // 4, sorted(layers)
    assert 3 * real.num_hidden_layers // 4 <= max(layers) < real.num_hidden_layers, sorted(layers)


@pytest.mark.parametrize("config", CONFIG_FILES, ids=lambda path: path.name)
def test_example_plan_resolves_against_its_family(
    config: Path, example_model, tmp_path: Path, capsys
) -> None:
    real = real_model_of(config)
    assert real.model_type in EXPECTED_TENSORS, f"{real.model_type}: no expected tensors for this family"
    model, measurements = example_model(real)
    plan_path = plan_for_fixture(config, model, measurements, tmp_path)
    plan = load_plan(plan_path)
    checkpoint = open_checkpoint(plan.model)
    assert (checkpoint.model_type, checkpoint.num_layers) == (real.model_type, real.num_hidden_layers)

    resolution: Resolution = resolve(plan, checkpoint, load_measurements(plan.measurements))

    edited = {edit.tensor for edit in resolution.edits}
    assert {edit.layer for edit in resolution.edits} == planned_layers(plan)
    expected = expected_edits(plan, real, model)
    assert edited == expected, (
        f"missing: {sorted(expected - edited)[:8]}; unexpected: {sorted(edited - expected)[:8]}"
    )
    assert sharded_ablate.main([str(plan_path), "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert f"{len(resolution.edits)} tensor edits" in listing
    assert not plan.output.exists()


def test_every_example_config_has_its_file_and_every_family_an_example() -> None:
    names = {path.name for path in CONFIG_FILES}
    assert set(REAL_MODELS) <= names, f"listed without a file: {sorted(set(REAL_MODELS) - names)}"
    covered = {real.model_type for name, real in REAL_MODELS.items() if name in names}
    assert covered == set(FAMILIES), f"families without an example plan: {sorted(set(FAMILIES) - covered)}"
