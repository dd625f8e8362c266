"""Plan validation and resolution: every bad input is one clear line, exit status 2, and no output."""
from __future__ import annotations

import json
import shutil
import tracemalloc
from pathlib import Path

import pytest
import torch

from lib.measurements import LayerMeasurement, Measurements, save_measurements
from tests.ablate_helpers import run_ablate, write_measurements, write_plan
from tests.fixtures import DAMAGES, DEFAULT_NUM_LAYERS, HIDDEN_SIZE, damaged_copy


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


def assert_refused(plan: dict, tmp_path: Path, capsys, *fragments: str, extra: tuple[str, ...] = ()) -> str:
    status, error, _ = run_ablate([str(write_plan(tmp_path / "plan.yml", plan)), *extra], capsys)
    assert status == 2
    assert error.startswith("error: ") and error.count("\n") == 1, error
    for fragment in fragments:
        assert fragment in error, error
    assert sorted(path.name for path in tmp_path.iterdir()) == ["m.pt", "plan.yml"], "nothing may be written"
    return error


def test_the_valid_plan_runs(setup, capsys) -> None:
    plan, tmp_path = setup
    assert run_ablate([str(write_plan(tmp_path / "plan.yml", plan))], capsys).status == 0 and (tmp_path / "out" / "config.json").is_file()


@pytest.mark.parametrize(
    "change, fragments",
    [
        (lambda plan: plan["ablate"][0].update(sparcity=0.5), ("ablate[0].sparcity", "unknown key", "did you mean 'sparsity'")),
        (lambda plan: plan.update(scael=2), ("scael: unknown key", "allowed here: model, measurements")),
        (lambda plan: plan["ablate"][0].update(layer=4), ("ablate[0].layer", "layer 4 is out of range", "0..3")),
        (lambda plan: plan["ablate"][0].update(layer="2-9"), ("plan.yml: ablate[0].layer: layers 4-9 are out of range", "0..3")),
        (lambda plan: plan["ablate"][0].update(layer=[5, "2-3", 7, 8]), ("plan.yml: ablate[0].layer: layers 5, 7-8 are",)),
        (lambda plan: plan["ablate"][0].update(layer="9-2"), ("ablate[0].layer", "inclusive range")),
        (lambda plan: plan.update(ablate=[{"layer": [0, "1-3"]}, {"layer": "2-30000000"}]),
         ("ablate[1].layer: layers 2-3 are already planned by ablate[0]",)),
        (lambda plan: plan["ablate"][0].update(layer=["1-2", 2]), ("layer 2 is already planned earlier",)),
        (lambda plan: plan["ablate"][0].update(layer=-1), ("ablate[0].layer", "layer number >= 0")),
        (lambda plan: plan["ablate"][0].update(measurement=7), ("ablate[0].measurement", "no layer 7", "0..4")),
        (lambda plan: plan["ablate"][0].update(measurement=4.5), ("ablate[0].measurement", "no layer 5")),
        (lambda plan: plan["ablate"][0].update(measurement="20"), ("ablate[0].measurement", "measured layer (int)")),
        (lambda plan: plan["ablate"][0].update(measurement=[]), ("ablate[0].measurement", "empty list")),
        (lambda plan: plan["ablate"][0].update(sparsity=0.0), ("ablate[0].sparsity", "(0, 1]", "older tools")),
        (lambda plan: plan["ablate"][0].update(sparsity=1.5), ("ablate[0].sparsity", "(0, 1]")),
        (lambda plan: plan["ablate"][0].update(scale=float("nan")), ("ablate[0].scale", "finite number")),
        (lambda plan: plan["ablate"][0].update(components=["attention"]), ("ablate[0].components[0]", "attention_output")),
        (lambda plan: plan.update(components=["embeddings"]), ("components[0]", "top-level 'embeddings'")),
        (lambda plan: plan.update(projected="yes please"), ("projected", "true or false")),
        (lambda plan: plan["ablate"].append({"layer": 1}), ("ablate[1].layer", "already planned by ablate[0]")),
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
    assert_refused(plan, tmp_path, capsys, "ablate[0].components", "model_type llama has no router tensors",
                   "it has: attention_output, mlp_output")


def test_all_problems_are_reported_together(setup, capsys) -> None:
    plan, tmp_path = setup
    plan["ablate"] = [{"layer": 1, "sparsity": 2}, {"layer": 2, "colour": "red"}]
    plan["invert"] = 1
    error = assert_refused(plan, tmp_path, capsys, "3 problems")
    assert "ablate[0].sparsity" in error and "ablate[1].colour" in error and "invert" in error


def test_a_direction_that_cancels_out_is_refused(setup, capsys) -> None:
    plan, tmp_path = setup
    direction = torch.randn(HIDDEN_SIZE)
    layers = {index: LayerMeasurement(None, None, sign * direction, sign * direction / direction.norm())
              for index, sign in enumerate([1, -1, 1, 1, 1])}
    save_measurements(Measurements(DEFAULT_NUM_LAYERS, layers), tmp_path / "m.pt")
    plan["ablate"][0]["measurement"] = [0, 1]
    assert_refused(plan, tmp_path, capsys, "ablate[0]", "direction is zero", "mean of measurement 0 and measurement 1")


def test_projected_needs_harmless_means(setup, capsys) -> None:
    plan, tmp_path = setup
    direction = torch.randn(HIDDEN_SIZE)
    layers = {index: LayerMeasurement(None, None, direction, direction / direction.norm()) for index in range(5)}
    save_measurements(Measurements(DEFAULT_NUM_LAYERS, layers), tmp_path / "m.pt")
    assert_refused(plan, tmp_path, capsys, "ablate[0].projected", "harmless mean of layer 1", extra=("--projected",))


def test_non_finite_measurements_are_refused(setup, capsys) -> None:
    plan, tmp_path = setup
    torch.save({"layers": DEFAULT_NUM_LAYERS, **{f"refuse_{index}": torch.full((HIDDEN_SIZE,), float("nan"))
                                                  for index in range(5)}}, tmp_path / "m.pt")
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
    assert "'falcon' is not supported" in error and "gpt_oss, llama" in error and "qwen3_moe" in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_model_files_are_named(setup, capsys, tmp_path_factory: pytest.TempPathFactory,
                                       damage: str) -> None:
    plan, tmp_path = setup
    model, broken = damaged_copy(Path(plan["model"]), tmp_path_factory.mktemp("damaged") / "model", damage)
    plan["model"] = str(model)
    assert_refused(plan, tmp_path, capsys, f"error: {broken}: ")


def test_invalid_yaml_names_the_line(setup, capsys) -> None:
    _, tmp_path = setup
    (tmp_path / "plan.yml").write_text("model: x\nablate:\n  - layer: [1\n")
    status, error, _ = run_ablate([str(tmp_path / "plan.yml")], capsys)
    assert status == 2 and "not valid YAML at line" in error


def test_legacy_plan_format_is_accepted(setup, capsys) -> None:
    """The hand-written format of older tools: model, measurements, output, ablate with all four keys."""
    plan, tmp_path = setup
    (tmp_path / "plan.yml").write_text(
        f"model: {plan['model']}\nmeasurements: {plan['measurements']}\noutput: {plan['output']}\n"
        "ablate:\n  - layer: 1\n    measurement: 3\n    scale: 1.0\n    sparsity: 1.00\n"
        "  - layer: 2\n    measurement: 3\n    scale: 0.5\n    sparsity: 1.0\n"
    )
    assert run_ablate([str(tmp_path / "plan.yml"), "--dry-run"], capsys).status == 0


def test_dry_run_prints_the_resolved_edit_list_and_writes_nothing(setup, capsys) -> None:
    plan, tmp_path = setup
    plan.update(scale=0.5, projected=True)
    plan["ablate"] = [{"layer": "1-2", "measurement": 2.25, "sparsity": 0.5, "norm_preserve": True},
                      {"layer": [3], "measurement": [1, 3], "scale": 2, "components": ["attention_output"]}]
    status, _, output = run_ablate([str(write_plan(tmp_path / "plan.yml", plan)), "--dry-run", "--invert"], capsys)
    lines = output.splitlines()
    assert status == 0 and not (tmp_path / "out").exists()
    table = lines[lines.index(next(line for line in lines if line.startswith("TENSOR"))) + 1:]
    rows = {line.split()[0]: line for line in table}
    assert sorted(rows) == [
        "model.layers.1.mlp.down_proj.weight", "model.layers.1.self_attn.o_proj.weight",
        "model.layers.2.mlp.down_proj.weight", "model.layers.2.self_attn.o_proj.weight",
        "model.layers.3.self_attn.o_proj.weight",
    ]
    layer_one = rows["model.layers.1.self_attn.o_proj.weight"].split()
    assert layer_one[1:6] == ["writer", "[hidden,", "in]", "norm-preserving", "1"]
    assert "ablate[0]" in layer_one and "-0.5" in layer_one  # 0.5 global x 1.0, negated by --invert
    assert "measurement 2.25, projected against harmless 1, sparsity 0.5" in rows["model.layers.1.self_attn.o_proj.weight"]
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
    plan = write_plan(tmp_path / "plan.yml", {"model": str(model), "measurements": str(tmp_path / "m.pt"),
                                              "output": str(tmp_path / "out"), "ablate": [{"layer": 1}]})
    status, error, _ = run_ablate([str(plan)], capsys)
    assert status == 2 and "ablate[0]: layer 1 has no mlp_output tensor" in error and "block_sparse_moe" in error
    assert not (tmp_path / "out").exists()


def test_missing_experts_are_refused(tiny_model, tmp_path: Path, capsys) -> None:
    model = relabelled_copy(tiny_model("mixtral"), tmp_path / "models" / "mixtral", num_local_experts=8)
    write_measurements(tmp_path / "m.pt", HIDDEN_SIZE, DEFAULT_NUM_LAYERS)
    plan = write_plan(tmp_path / "plan.yml", {"model": str(model), "measurements": str(tmp_path / "m.pt"),
                                              "output": str(tmp_path / "out"), "ablate": [{"layer": "0-1"}]})
    status, error, _ = run_ablate([str(plan)], capsys)
    assert status == 2 and "2 problems" in error and "layer 1 has 4 experts' output tensors" in error
    assert "num_local_experts = 8" in error
