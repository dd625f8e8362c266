"""search.py: the optimiser finds a known best plan, the written plan is what its trial scored, a killed
search resumes from its storage, and bad input is refused before the model loads."""

from __future__ import annotations

import itertools
import json
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import optuna
import pytest

import search
from lib.ablate.checkpoint import open_checkpoint
from lib.ablate.plan import PROJECTED_AT_BOTH, load_plan
from lib.ablate.resolution import Resolution
from lib.core.errors import run_cli
from lib.measure.measurements import load_measurements
from lib.search.engine import (
    PlanContext,
    Score,
    SearchSpace,
    TrialPlan,
    choose,
    completed,
    make_sampler,
    pareto_front,
    run_trials,
    trial_plan_of,
)
from tests.ablate_helpers import run_ablate
from tests.fixtures import ALL_FAMILIES, DEFAULT_NUM_LAYERS, HIDDEN_SIZE
from tests.measurement_files import write_measurements
from tests.scripts import IN_PROCESS_AND_AS_A_PROCESS, run_script

REPOSITORY = Path(__file__).resolve().parent.parent


# ---- the optimiser on a constructed case -------------------------------------------------------


class ConstructedScorer:
    """A known landscape over real resolutions: each of four conditions unmet refuses one more of four
    prompts (layers 1-2 edited, the measurement-3 direction, projected at both places, a scale within
    0.25 of 1.6); KL grows with the distance of the scale from 1.6 and with every other edited layer."""

    original = Score(4, 4, 0, 4, 0.0, 0.0, 0.0, 0.0)

    def score(self, resolution: Resolution) -> Score:
        edits = resolution.edits
        layers = {edit.layer for edit in edits}
        label, scale = edits[0].direction_label, edits[0].scale
        conditions = (
            {1, 2} <= layers,
            label.startswith("measurement 3,") or label == "measurement 3",
            ("at the measurement" in label and "projected against harmless 1" in label)
            or ("at the measurement" in label and "projected against harmless 2" in label),
            abs(scale - 1.6) < 0.25,
        )
        kl = abs(scale - 1.6) + 0.1 * len(layers - {1, 2}) + 0.01
        return Score(conditions.count(False), 4, 0, 4, kl, kl, kl, 0.0)


def fixture_context(source: Path, tmp_path: Path) -> PlanContext:
    """Trials on a fixture model with random measurements, plan and output under tmp_path."""
    write_measurements(tmp_path / "m.pt", HIDDEN_SIZE, DEFAULT_NUM_LAYERS)
    return PlanContext(
        open_checkpoint(source),
        load_measurements(tmp_path / "m.pt"),
        str(source),
        tmp_path / "m.pt",
        tmp_path / "plan.yml",
        tmp_path / "out",
    )


def test_the_search_finds_the_known_best_plan_of_a_constructed_case(tiny_model, tmp_path: Path) -> None:
    source = tiny_model("llama")
    context = fixture_context(source, tmp_path)
    checkpoint = context.checkpoint
    space = SearchSpace.for_checkpoint(checkpoint, range(1, 4))
    study = optuna.create_study(
        directions=["minimize", "minimize"], sampler=make_sampler(seed=0, refusal_target=0.05)
    )
    study.enqueue_trial(TrialPlan(2, 0, 3, 1.0, "none", False, "all").parameters())  # a poor start
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    run_trials(
        study, space, context, ConstructedScorer(), trials=150, deadline=None, on_trial=lambda trial: None
    )
    best = trial_plan_of(choose(completed(study), refusal_target=0.05))
    assert (best.measurement, best.first_layer, best.last_layer) == (3, 1, 2)
    assert best.projected == PROJECTED_AT_BOTH and abs(best.scale - 1.6) < 0.25
    assert choose(completed(study), 0.05).values[0] == 0.0
    front = pareto_front(completed(study))
    assert front[0].values[0] == 0.0 and all(a.values[1] >= b.values[1] for a, b in itertools.pairwise(front))


@pytest.mark.parametrize("model_type", ALL_FAMILIES)
def test_every_component_group_the_space_offers_resolves_on_the_family(
    tiny_model, tmp_path: Path, model_type
) -> None:
    """A group naming components the family lacks (a router on a dense model) would fail every such trial."""
    source = tiny_model(model_type)
    context = fixture_context(source, tmp_path)
    checkpoint = context.checkpoint
    space = SearchSpace.for_checkpoint(checkpoint, range(1, 4))
    assert len(space.component_groups) >= 3  # all, attention output, MLP output
    for group in space.component_groups:
        resolution = context.resolution(TrialPlan(2, 0, DEFAULT_NUM_LAYERS - 1, 1.0, "none", False, group))
        assert resolution.edits


def test_choose_prefers_the_lowest_kl_meeting_the_target_else_the_lowest_refusal() -> None:
    trial = _frozen
    trials = [trial(0, 0.10, 0.001), trial(1, 0.04, 0.2), trial(2, 0.0, 0.5), trial(3, 0.05, 0.1)]
    assert choose(trials, 0.05).number == 3
    assert choose(trials, 0.0).number == 2
    assert choose([trial(0, 0.5, 0.1), trial(1, 0.3, 0.9)], 0.05).number == 1
    assert choose([], 0.05) is None


def _frozen(number: int, refusal: float, kl: float) -> optuna.trial.FrozenTrial:
    frozen = optuna.trial.create_trial(values=[refusal, kl])
    frozen.number = number
    return frozen


# ---- search.py on the refusing toy model ---------------------------------------------------------


@pytest.fixture(scope="module")
def measured_demo(shipped_demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toy model measured on the first 64 prompts of each set, in about a fifth of the full sets'
    time: these searches test what search.py writes and how it resumes, which no test here ties to the
    quality of the directions."""
    import measure

    path = tmp_path_factory.mktemp("search-measure") / "m.pt"
    arguments = ["--model", str(shipped_demo_model), "--output", str(path), "--max-prompts", "64"]
    assert measure.main(arguments) == 0
    return path


def search_arguments(model: Path, measurements: Path, work: Path, *extra: str) -> list[str]:
    return [
        "--model",
        str(model),
        "--measurements",
        str(measurements),
        "--plan",
        str(work / "plan.yml"),
        "--output",
        str(work / "edited"),
        "--json",
        str(work / "trials.json"),
        "--chart",
        str(work / "search.png"),
        "--scoring-prompts",
        "24",
        "--reply-tokens",
        "8",
        *extra,
    ]


def test_the_written_plan_is_the_chosen_trial_and_scores_what_it_recorded(
    shipped_demo_model: Path, measured_demo: Path, tmp_path: Path
) -> None:
    assert search.main(search_arguments(shipped_demo_model, measured_demo, tmp_path, "--trials", "8")) == 0
    report = json.loads((tmp_path / "trials.json").read_text())
    assert len(report["trials"]) == 8 and report["trials"][0]["plan"]["projected"] == "none"  # the suggestion
    assert [trial["state"] for trial in report["trials"]] == ["COMPLETE"] * 8
    chosen = next(trial for trial in report["trials"] if trial["number"] == report["chosen"])
    assert chosen["number"] in report["pareto_front"]
    meeting = [
        trial
        for trial in report["trials"]
        if trial["state"] == "COMPLETE"
        and trial["harmful_refused"] / trial["harmful_prompts"] <= report["refusal_target"]
    ]
    if meeting:
        assert chosen["kl_mean"] == min(trial["kl_mean"] for trial in meeting)
    assert (tmp_path / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    plan = load_plan(tmp_path / "plan.yml")  # an ordinary plan file
    (entry,) = plan.entries
    parameters = chosen["plan"]
    assert entry.measurement == parameters["measurement"]
    assert entry.layer_ranges == (range(parameters["first_layer"], parameters["last_layer"] + 1),)
    assert entry.options.scale == pytest.approx(parameters["scale"], rel=1e-3)
    assert (entry.options.projected, entry.options.norm_preserve) == (
        parameters["projected"],
        parameters["norm_preserve"],
    )
    text = (tmp_path / "plan.yml").read_text()
    assert f"trial {chosen['number']} of 8" in text and "Pareto front" in text
    assert run_ablate([str(tmp_path / "plan.yml")]).status == 0
    assert (tmp_path / "edited" / "config.json").is_file()


def completed_trials_in(database: Path) -> int:
    """Completed trials in a storage another process is still creating, read without writing to it: optuna's
    own storage class would create the schema itself and race the search process doing the same."""
    if not database.exists():
        return 0
    try:
        with closing(sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True)) as connection:
            (count,) = connection.execute("SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'").fetchone()
    except sqlite3.OperationalError:  # the schema is not there yet, or the file is locked mid-write
        return 0
    return count


@pytest.mark.slow  # two search.py processes, one killed mid-run: over a minute on 2 cores
def test_a_killed_search_resumes_from_its_storage(
    shipped_demo_model: Path, measured_demo: Path, tmp_path: Path
) -> None:
    storage = f"sqlite:///{tmp_path / 'search.db'}"
    arguments = search_arguments(
        shipped_demo_model, measured_demo, tmp_path, "--trials", "6", "--storage", storage
    )
    process = subprocess.Popen(
        [sys.executable, "search.py", *arguments],
        cwd=REPOSITORY,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            if completed_trials_in(tmp_path / "search.db") >= 2:
                break
            time.sleep(0.2)
        assert process.poll() is None, "the search ended before it could be killed"
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        process.kill()
    assert not (tmp_path / "plan.yml").exists()  # nothing is written before the search ends
    (name,) = optuna.get_all_study_names(storage)
    done_before = len(completed(optuna.load_study(study_name=name, storage=storage)))

    finished = subprocess.run(
        [sys.executable, "search.py", *arguments], cwd=REPOSITORY, capture_output=True, text=True, check=False
    )
    assert finished.returncode == 0, finished.stderr
    assert f"resuming study {name}" in finished.stderr
    study = optuna.load_study(study_name=name, storage=storage)
    assert len(completed(study)) >= done_before
    states = [trial.state for trial in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) + states.count(optuna.trial.TrialState.FAIL) >= 6
    report = json.loads((tmp_path / "trials.json").read_text())
    assert report["trials"][0]["plan"]["projected"] == "none"  # the suggestion, run once before the kill


# ---- bad input -----------------------------------------------------------------------------------


def run_search(arguments: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    with pytest.raises(SystemExit) as stopped:
        run_cli(search.main, arguments)
    return stopped.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (("--quant", "4bit"), "--quant 4bit: trials edit the loaded weights"),
        (("--refusal-target", "1.5"), "--refusal-target 1.5: must be a rate in [0, 1)"),
        (("--storage", "search.db"), "--storage search.db: not a storage URL"),
    ],
)
def test_bad_flags_are_refused_before_anything_loads(
    tiny_model, tmp_path: Path, capsys, extra, fragment
) -> None:
    write_measurements(tmp_path / "m.pt", HIDDEN_SIZE, DEFAULT_NUM_LAYERS)
    status, error = run_search(
        search_arguments(tiny_model("llama"), tmp_path / "m.pt", tmp_path, *extra), capsys
    )
    assert status == 2 and fragment in error and error.count("\n") == 1


def test_an_existing_plan_is_never_overwritten(tiny_model, tmp_path: Path, capsys) -> None:
    write_measurements(tmp_path / "m.pt", HIDDEN_SIZE, DEFAULT_NUM_LAYERS)
    (tmp_path / "plan.yml").write_text("# hand edits\n")
    status, error = run_search(search_arguments(tiny_model("llama"), tmp_path / "m.pt", tmp_path), capsys)
    assert status == 2 and "--plan" in error and "already exists" in error
    assert (tmp_path / "plan.yml").read_text() == "# hand edits\n"


def test_measurements_of_another_model_are_refused(tiny_model, tmp_path: Path, capsys) -> None:
    write_measurements(tmp_path / "m.pt", HIDDEN_SIZE + 8, DEFAULT_NUM_LAYERS)
    status, error = run_search(search_arguments(tiny_model("llama"), tmp_path / "m.pt", tmp_path), capsys)
    assert status == 2 and f"directions have {HIDDEN_SIZE + 8} components" in error
    assert not (tmp_path / "plan.yml").exists()


def test_a_prompt_set_with_nothing_held_back_is_refused(tiny_model, tmp_path: Path, capsys) -> None:
    write_measurements(tmp_path / "m.pt", HIDDEN_SIZE, DEFAULT_NUM_LAYERS)
    from lib.core.prompts import is_held_back_for_search

    kept = [
        f"harmful prompt {index}"
        for index in range(40)
        if not is_held_back_for_search(f"harmful prompt {index}")
    ]
    (tmp_path / "harmful.txt").write_text("\n".join(kept) + "\n")
    status, error = run_search(
        search_arguments(
            tiny_model("llama"), tmp_path / "m.pt", tmp_path, "--data-harmful", str(tmp_path / "harmful.txt")
        ),
        capsys,
    )
    assert status == 2 and "--data-harmful" in error and "no prompt of it is held back" in error


@IN_PROCESS_AND_AS_A_PROCESS
def test_help_explains_every_flag(capsys: pytest.CaptureFixture, as_a_process: bool) -> None:
    result = run_script("search", ["--help"], capsys, as_a_process=as_a_process)
    assert result.status == 0
    for flag in (
        "--model",
        "--measurements",
        "--plan",
        "--output",
        "--trials",
        "--storage",
        "--json",
        "--chart",
        "--data-harmful",
        "--data-harmless",
        "--time-budget",
        "--refusal-target",
    ):
        assert flag in result.out
