"""Plan validation and resolution: every bad input is one clear line, exit status 2, and no output."""

from __future__ import annotations

import json
import shutil
import tracemalloc
from pathlib import Path

import pytest
import torch

from lib.ablate.plan import load_plan
from lib.measure.measurements import LayerMeasurement, Measurements, save_measurements
from tests.ablate_helpers import rewrite_header, run_ablate, write_plan
from tests.fixtures import DAMAGES, DEFAULT_NUM_LAYERS, HIDDEN_SIZE, damaged_copy
from tests.measurement_files import write_measurements


@pytest.fixture
def setup(tiny_model, tmp_path: Path):
    """A llama fixture, a measurement file and a valid plan dict to break in each test."""
    write_measurements(tmp_path / "m.pt", HIDDEN_SIZE, DEFAULT_NUM_LAYERS)
    plan = {
        "model": str(tiny_model("llama")),
        "measurements": str(tmp_path / "m.pt"),
        "output": str(tmp_path / "out"),
        "ablate": [{"layer": 1, "measurement": 2, "scale": 1.0, "sparsity": 1.0}],
    }
    return plan, tmp_path


def assert_refused(
    plan: dict,
    tmp_path: Path,
    capsys,
    *fragments: str,
    extra: tuple[str, ...] = (),
    extra_files: tuple[str, ...] = (),
) -> str:
    """Exit status 2, one line naming every fragment, and nothing written beside the test's `extra_files`."""
    status, error, _ = run_ablate([str(write_plan(tmp_path / "plan.yml", plan)), *extra], capsys)
    assert status == 2
    assert error.startswith("error: ") and error.count("\n") == 1, error
    for fragment in fragments:
        assert fragment in error, error
    written = sorted(path.name for path in tmp_path.iterdir())
    assert written == sorted(["m.pt", "plan.yml", *extra_files]), "nothing may be written"
    return error


def test_the_valid_plan_runs(setup, capsys) -> None:
    plan, tmp_path = setup
    assert (
        run_ablate([str(write_plan(tmp_path / "plan.yml", plan))], capsys).status == 0
        and (tmp_path / "out" / "config.json").is_file()
    )


@pytest.mark.parametrize(
    "change, fragments",
    [
        (
            lambda plan: plan["ablate"][0].update(sparcity=0.5),
            ("ablate[0].sparcity", "unknown key", "did you mean 'sparsity'"),
        ),
        (lambda plan: plan.update(scael=2), ("scael: unknown key", "allowed here: model, measurements")),
        (
            lambda plan: plan["ablate"][0].update(layer=4),
            ("ablate[0].layer", "layer 4 is out of range", "0..3"),
        ),
        (
            lambda plan: plan["ablate"][0].update(layer="2-9"),
            ("plan.yml: ablate[0].layer: layers 4-9 are out of range", "0..3"),
        ),
        (
            lambda plan: plan["ablate"][0].update(layer=[5, "2-3", 7, 8]),
            ("plan.yml: ablate[0].layer: layers 5, 7-8 are",),
        ),
        (lambda plan: plan["ablate"][0].update(layer="9-2"), ("ablate[0].layer", "inclusive range")),
        (
            lambda plan: plan.update(ablate=[{"layer": [0, "1-3"]}, {"layer": "2-30000000"}]),
            ("ablate[1].layer: layers 2-3 are already planned by ablate[0]",),
        ),
        (lambda plan: plan["ablate"][0].update(layer=["1-2", 2]), ("layer 2 is already planned earlier",)),
        (lambda plan: plan["ablate"][0].update(layer=-1), ("ablate[0].layer", "layer number >= 0")),
        (
            lambda plan: plan["ablate"][0].update(measurement=7),
            ("ablate[0].measurement", "no layer 7", "0..4"),
        ),
        (lambda plan: plan["ablate"][0].update(measurement=4.5), ("ablate[0].measurement", "no layer 5")),
        (
            lambda plan: plan["ablate"][0].update(measurement="20"),
            ("ablate[0].measurement", "measured layer (int)"),
        ),
        (lambda plan: plan["ablate"][0].update(measurement=[]), ("ablate[0].measurement", "empty list")),
        (
            lambda plan: plan["ablate"][0].update(sparsity=0.0),
            ("ablate[0].sparsity", "(0, 1]", "older tools"),
        ),
        (lambda plan: plan["ablate"][0].update(sparsity=1.5), ("ablate[0].sparsity", "(0, 1]")),
        (lambda plan: plan["ablate"][0].update(scale=float("nan")), ("ablate[0].scale", "finite number")),
        (
            lambda plan: plan["ablate"][0].update(components=["attention"]),
            ("ablate[0].components[0]", "attention_output"),
        ),
        (lambda plan: plan.update(components=["embeddings"]), ("components[0]", "top-level 'embeddings'")),
        (lambda plan: plan.update(projected="yes please"), ("projected", "none, measurement, edited, both")),
        (
            lambda plan: plan["ablate"].append({"layer": 1}),
            ("ablate[1].layer", "already planned by ablate[0]"),
        ),
        (lambda plan: plan.update(ablate=[]), ("ablate", "is empty")),
        (lambda plan: plan.pop("output"), ("output", "required")),
        (lambda plan: plan.update(embeddings={"scale": 1}), ("embeddings", "'measurement'")),
        (lambda plan: plan.update(model="/nonexistent/model"), ("/nonexistent/model", "not found")),
        (lambda plan: plan.update(measurements="missing.pt"), ("missing.pt", "not found")),
    ],
)
def test_bad_plans_name_the_yaml_path_and_what_is_allowed(setup, capsys, change, fragments) -> None:
    plan, tmp_path = setup
    change(plan)
    assert_refused(plan, tmp_path, capsys, *fragments)


def test_a_huge_layer_range_is_refused_without_expanding_it(setup, capsys) -> None:
    """A typo like "2-30000000" for "2-3" once took 23 s and 3.4 GB to be found out of range."""
    plan, tmp_path = setup
    plan["ablate"][0]["layer"] = "2-30000000"
    tracemalloc.start()
    try:
        assert_refused(plan, tmp_path, capsys, "ablate[0].layer: layers 4-30000000 are out of range", "0..3")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20  # the 30 million layer numbers alone, as Python ints in a list, take over 1 GB


def test_components_the_family_lacks_are_refused(setup, capsys) -> None:
    plan, tmp_path = setup
    plan["ablate"][0]["components"] = ["attention_output", "router", "biases"]
    assert_refused(
        plan,
        tmp_path,
        capsys,
        "ablate[0].components",
        "model_type llama has no router tensors",
        "it has: attention_output, mlp_output",
    )


def test_all_problems_are_reported_together(setup, capsys) -> None:
    plan, tmp_path = setup
    plan["ablate"] = [{"layer": 1, "sparsity": 2}, {"layer": 2, "colour": "red"}]
    plan["invert"] = 1
    error = assert_refused(plan, tmp_path, capsys, "3 problems")
    assert "ablate[0].sparsity" in error and "ablate[1].colour" in error and "invert" in error


def test_a_direction_that_cancels_out_is_refused(setup, capsys) -> None:
    plan, tmp_path = setup
    direction = torch.randn(HIDDEN_SIZE)
    layers = {
        index: LayerMeasurement(None, None, sign * direction, sign * direction / direction.norm())
        for index, sign in enumerate([1, -1, 1, 1, 1])
    }
    save_measurements(Measurements(DEFAULT_NUM_LAYERS, layers), tmp_path / "m.pt")
    plan["ablate"][0]["measurement"] = [0, 1]
    assert_refused(
        plan, tmp_path, capsys, "ablate[0]", "direction is zero", "mean of measurement 0 and measurement 1"
    )


def test_projected_needs_harmless_means(setup, capsys) -> None:
    plan, tmp_path = setup
    direction = torch.randn(HIDDEN_SIZE)
    layers = {
        index: LayerMeasurement(None, None, direction, direction / direction.norm()) for index in range(5)
    }
    save_measurements(Measurements(DEFAULT_NUM_LAYERS, layers), tmp_path / "m.pt")
    assert_refused(
        plan, tmp_path, capsys, "ablate[0].projected", "harmless mean of layer 1", extra=("--projected",)
    )


def test_non_finite_measurements_are_refused(setup, capsys) -> None:
    plan, tmp_path = setup
    torch.save(
        {
            "layers": DEFAULT_NUM_LAYERS,
            **{f"refuse_{index}": torch.full((HIDDEN_SIZE,), float("nan")) for index in range(5)},
        },
        tmp_path / "m.pt",
    )
    assert_refused(plan, tmp_path, capsys, "m.pt", "NaN")


def test_measurements_of_another_model_are_refused(setup, capsys) -> None:
    plan, tmp_path = setup
    write_measurements(tmp_path / "m.pt", HIDDEN_SIZE * 2, DEFAULT_NUM_LAYERS + 2)
    assert_refused(plan, tmp_path, capsys, "128 components", "hidden size is 64", "6 layers")


def test_unknown_family_lists_the_supported_ones(setup, capsys, tmp_path: Path) -> None:
    plan, _ = setup
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "falcon"}')
    plan["model"] = str(model)
    error = run_ablate([str(write_plan(tmp_path / "plan.yml", plan))], capsys).error
    assert (
        "'falcon' is not supported" in error
        and "gpt_oss, granitemoe, llama, llama4" in error
        and "qwen3_moe" in error
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_model_files_are_named(
    setup, capsys, tmp_path_factory: pytest.TempPathFactory, damage: str
) -> None:
    plan, tmp_path = setup
    model, broken = damaged_copy(Path(plan["model"]), tmp_path_factory.mktemp("damaged") / "model", damage)
    plan["model"] = str(model)
    assert_refused(plan, tmp_path, capsys, f"error: {broken}: ")


def test_invalid_yaml_names_the_line(setup, capsys) -> None:
    _, tmp_path = setup
    (tmp_path / "plan.yml").write_text("model: x\nablate:\n  - layer: [1\n")
    status, error, _ = run_ablate([str(tmp_path / "plan.yml")], capsys)
    assert status == 2 and "not valid YAML at line" in error


def plan_text(plan: dict, entry: str) -> str:
    """The setup's plan as hand-written YAML, with `entry` as its `ablate` block, verbatim."""
    return (
        f"model: {plan['model']}\nmeasurements: {plan['measurements']}\noutput: {plan['output']}\n"
        f"ablate:\n{entry}"
    )


@pytest.mark.parametrize(
    "entry, problem",
    [
        (
            "  - layer: 1\n    scale: 1.0\n    scale: 0\n",
            "key 'scale' appears twice (lines 6 and 7); keep one",
        ),
        ("  - layer: 1\nablate:\n  - layer: 2\n", "key 'ablate' appears twice (lines 4 and 6); keep one"),
    ],
    ids=["scale", "ablate"],
)
def test_a_key_given_twice_is_refused_naming_both_lines(setup, capsys, entry: str, problem: str) -> None:
    """YAML would keep the last one silently: a second `scale: 0` shipped an unedited model as ablated."""
    plan, tmp_path = setup
    (tmp_path / "plan.yml").write_text(plan_text(plan, entry))
    status, error, _ = run_ablate([str(tmp_path / "plan.yml")], capsys)
    assert (status, error) == (2, f"error: {tmp_path / 'plan.yml'}: {problem}\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "entry, layers, scale",
    [
        ("  - layer: [010, 011]\n", (10, 11), 1.0),  # YAML 1.1 reads octal: layers 8 and 9
        ("  - layer: [0o10, 0x0b]\n", (8, 11), 1.0),
        ("  - layer: 1\n    scale: 5e-1\n", (1,), 0.5),  # YAML 1.1 reads a string
    ],
    ids=["leading-zeros", "octal-and-hex", "exponent"],
)
def test_numbers_read_as_written(setup, entry: str, layers: tuple[int, ...], scale: float) -> None:
    plan, tmp_path = setup
    (tmp_path / "plan.yml").write_text(plan_text(plan, entry))
    parsed = load_plan(tmp_path / "plan.yml")
    written_layers = tuple(layer for layer_range in parsed.entries[0].layer_ranges for layer in layer_range)
    assert written_layers == layers and parsed.entries[0].options.scale == scale


def test_yes_is_not_a_boolean(setup, capsys) -> None:
    """YAML 1.1's yes/no/on/off are plain words in YAML 1.2: a flag takes true or false."""
    plan, tmp_path = setup
    (tmp_path / "plan.yml").write_text(plan_text(plan, "  - layer: 1\n    norm_preserve: yes\n"))
    status, error, _ = run_ablate([str(tmp_path / "plan.yml")], capsys)
    assert status == 2 and "ablate[0].norm_preserve: must be true or false, got 'yes'" in error


def test_legacy_plan_format_is_accepted(setup, capsys) -> None:
    """The hand-written format of older tools: model, measurements, output, ablate with all four keys."""
    plan, tmp_path = setup
    (tmp_path / "plan.yml").write_text(
        plan_text(
            plan,
            "  - layer: 1\n    measurement: 3\n    scale: 1.0\n    sparsity: 1.00\n"
            "  - layer: 2\n    measurement: 3\n    scale: 0.5\n    sparsity: 1.0\n",
        )
    )
    assert run_ablate([str(tmp_path / "plan.yml"), "--dry-run"], capsys).status == 0


def test_dry_run_prints_the_resolved_edit_list_and_writes_nothing(setup, capsys) -> None:
    plan, tmp_path = setup
    plan.update(scale=0.5, projected=True)
    plan["ablate"] = [
        {"layer": "1-2", "measurement": 2.25, "sparsity": 0.5, "norm_preserve": True},
        {"layer": [3], "measurement": [1, 3], "scale": 2, "components": ["attention_output"]},
    ]
    status, _, output = run_ablate(
        [str(write_plan(tmp_path / "plan.yml", plan)), "--dry-run", "--invert"], capsys
    )
    lines = output.splitlines()
    assert status == 0 and not (tmp_path / "out").exists()
    table = lines[lines.index(next(line for line in lines if line.startswith("TENSOR"))) + 1 :]
    rows = {line.split()[0]: line for line in table}
    assert sorted(rows) == [
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.1.self_attn.o_proj.weight",
        "model.layers.2.mlp.down_proj.weight",
        "model.layers.2.self_attn.o_proj.weight",
        "model.layers.3.self_attn.o_proj.weight",
    ]
    layer_one = rows["model.layers.1.self_attn.o_proj.weight"].split()
    assert layer_one[1:6] == ["writer", "[hidden,", "in]", "norm-preserving", "1"]
    assert "ablate[0]" in layer_one and "-0.5" in layer_one  # 0.5 global x 1.0, negated by --invert
    assert (
        "measurement 2.25, projected against harmless 1, sparsity 0.5"
        in rows["model.layers.1.self_attn.o_proj.weight"]
    )
    assert "projected against harmless 2" in rows["model.layers.2.mlp.down_proj.weight"]
    assert "-1" in rows["model.layers.3.self_attn.o_proj.weight"].split()
    assert "mean of measurement 1 and measurement 3" in rows["model.layers.3.self_attn.o_proj.weight"]


def relabelled_copy(source: Path, directory: Path, **config_changes) -> Path:
    shutil.copytree(source, directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(config_changes)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_tensors_the_family_does_not_explain_are_refused(tiny_model, tmp_path: Path, capsys) -> None:
    """A llama checkpoint labelled mixtral: its MLP is not where a Mixtral keeps it, so nothing is guessed."""
    model = relabelled_copy(tiny_model("llama"), tmp_path / "models" / "relabelled", model_type="mixtral")
    write_measurements(tmp_path / "m.pt", HIDDEN_SIZE, DEFAULT_NUM_LAYERS)
    plan = write_plan(
        tmp_path / "plan.yml",
        {
            "model": str(model),
            "measurements": str(tmp_path / "m.pt"),
            "output": str(tmp_path / "out"),
            "ablate": [{"layer": 1}],
        },
    )
    status, error, _ = run_ablate([str(plan)], capsys)
    assert (
        status == 2
        and "ablate[0]: layer 1 has no mlp_output tensor" in error
        and "like block_sparse_moe.experts.E.w2.weight" in error
    )
    assert not (tmp_path / "out").exists()


def test_missing_experts_are_refused(tiny_model, tmp_path: Path, capsys) -> None:
    model = relabelled_copy(tiny_model("mixtral"), tmp_path / "models" / "mixtral", num_local_experts=8)
    write_measurements(tmp_path / "m.pt", HIDDEN_SIZE, DEFAULT_NUM_LAYERS)
    plan = write_plan(
        tmp_path / "plan.yml",
        {
            "model": str(model),
            "measurements": str(tmp_path / "m.pt"),
            "output": str(tmp_path / "out"),
            "ablate": [{"layer": "0-1"}],
        },
    )
    status, error, _ = run_ablate([str(plan)], capsys)
    assert status == 2 and "2 problems" in error and "layer 1 has 4 experts' output tensors" in error
    assert "num_local_experts = 8" in error


O_PROJ = "model.layers.1.self_attn.o_proj.weight"


def shard_holding(model: Path, tensor: str) -> Path:
    return model / json.loads((model / "model.safetensors.index.json").read_text())["weight_map"][tensor]


def test_a_shard_whose_tensors_overlap_is_refused(setup, capsys) -> None:
    """safetensors itself refuses such a file; streamed, the o_proj written was another tensor's bytes."""
    plan, tmp_path = setup
    plan["model"] = str(shutil.copytree(plan["model"], tmp_path / "models" / "overlapping"))
    shard = shard_holding(Path(plan["model"]), O_PROJ)

    def point_o_proj_at_a_tensor_of_its_size(header: dict) -> None:
        size = header[O_PROJ]["data_offsets"][1] - header[O_PROJ]["data_offsets"][0]
        other = next(
            name
            for name, entry in header.items()
            if name not in (O_PROJ, "__metadata__")
            and entry["data_offsets"][1] - entry["data_offsets"][0] == size
        )
        header[O_PROJ]["data_offsets"] = header[other]["data_offsets"]

    rewrite_header(shard, point_o_proj_at_a_tensor_of_its_size)
    error = assert_refused(
        plan,
        tmp_path,
        capsys,
        f"error: {shard}: tensor ",
        "overlaps tensor",
        "header is corrupt",
        extra_files=("models",),
    )
    assert O_PROJ in error


@pytest.mark.parametrize("extra", [(), ("--dry-run",)], ids=["ablate", "dry-run"])
def test_a_tensor_shaped_against_the_config_is_refused(setup, capsys, extra: tuple[str, ...]) -> None:
    """o_proj declared [32, 128] (as many bytes) though config.json says hidden_size 64."""
    plan, tmp_path = setup
    plan["model"] = str(shutil.copytree(plan["model"], tmp_path / "models" / "reshaped"))
    shard = shard_holding(Path(plan["model"]), O_PROJ)
    rewrite_header(shard, lambda header: header[O_PROJ].update(shape=[HIDDEN_SIZE // 2, HIDDEN_SIZE * 2]))
    assert_refused(
        plan,
        tmp_path,
        capsys,
        f"error: {shard}: tensor {O_PROJ} has shape [32, 128], but "
        f"config.json implies [hidden_size={HIDDEN_SIZE}, any]; "
        "the weights do not match the model's config",
        extra=extra,
        extra_files=("models",),
    )
