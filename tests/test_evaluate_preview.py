"""`evaluate.py --plan` previews a plan in memory: its report must be the report of `--ablated` on the
model sharded_ablate.py writes from the same plan, without writing anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from evaluate import main
from lib.core.errors import run_cli
from tests.ablate_helpers import run_ablate, write_plan
from tests.fixtures import DEFAULT_NUM_LAYERS, HIDDEN_SIZE
from tests.measurement_files import write_measurements
from tests.test_evaluate import prompt_files, run_evaluate  # noqa: F401 (the fixture is used by name)


def write_example_plan(source: Path, work: Path) -> Path:
    write_measurements(work / "m.pt", HIDDEN_SIZE, DEFAULT_NUM_LAYERS, seed=3)
    return write_plan(
        work / "plan.yml",
        {
            "model": str(source),
            "measurements": str(work / "m.pt"),
            "output": str(work / "out"),
            "scale": 4.0,  # strong enough that the replies change
            "ablate": [{"layer": "1-3", "measurement": 2, "projected": "measurement"}],
        },
    )


@pytest.mark.parametrize(
    "model_type",
    [
        "llama",
        pytest.param("qwen2_moe", marks=pytest.mark.slow),
        pytest.param("gemma2", marks=pytest.mark.slow),
    ],
)
def test_the_preview_reports_what_the_written_model_gives(
    model_type: str,
    tiny_model,
    prompt_files,  # noqa: F811
    tmp_path: Path,
) -> None:
    source = tiny_model(model_type, randomize_norms_and_biases=True)
    plan = write_example_plan(source, tmp_path)
    assert run_ablate([str(plan)]).status == 0
    (tmp_path / "written").mkdir()
    (tmp_path / "preview").mkdir()
    written = run_evaluate(
        prompt_files,
        tmp_path / "written" / "r.json",
        "--model",
        str(source),
        "--ablated",
        str(tmp_path / "out"),
    )
    files_before = sorted(path.name for path in tmp_path.iterdir())
    previewed = run_evaluate(
        prompt_files, tmp_path / "preview" / "r.json", "--model", str(source), "--plan", str(plan)
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == files_before  # nothing written but the report
    for role in ("original", "ablated"):
        assert previewed["models"][role]["replies"] == written["models"][role]["replies"]
    assert previewed["kl_divergence"]["mean"] == pytest.approx(written["kl_divergence"]["mean"], rel=1e-6)
    assert written["kl_divergence"]["mean"] > 1e-4  # the plan changed the model


def run(arguments: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    with pytest.raises(SystemExit) as stopped:
        run_cli(main, arguments)
    return stopped.value.code, capsys.readouterr().err


def test_preview_of_a_plan_for_another_model_is_refused_before_loading(
    tiny_model, tmp_path: Path, capsys
) -> None:
    plan = write_example_plan(tiny_model("llama"), tmp_path)
    write_measurements(tmp_path / "m.pt", HIDDEN_SIZE + 8, DEFAULT_NUM_LAYERS)
    status, error = run(["--model", str(tiny_model("llama")), "--plan", str(plan)], capsys)
    assert (
        status == 2
        and f"{plan}: measurements {tmp_path / 'm.pt'}: directions have {HIDDEN_SIZE + 8}" in error
    )


def test_preview_refuses_a_quantised_load(tiny_model, tmp_path: Path, capsys) -> None:
    plan = write_example_plan(tiny_model("llama"), tmp_path)
    status, error = run(["--model", str(tiny_model("llama")), "--plan", str(plan), "--quant", "4bit"], capsys)
    assert status == 2 and "--plan with --quant 4bit" in error and "drop the flag" in error


def test_plan_and_ablated_exclude_each_other(tiny_model, tmp_path: Path, capsys) -> None:
    plan = write_example_plan(tiny_model("llama"), tmp_path)
    with pytest.raises(SystemExit) as stopped:
        main(
            ["--model", str(tiny_model("llama")), "--plan", str(plan), "--ablated", str(tiny_model("llama"))]
        )
    assert stopped.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
