"""analyze.py: metrics on files of known geometry, the plan heuristic, the chart, the CLI and bad input."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from matplotlib import colors
from matplotlib import image as matplotlib_image
from matplotlib.container import BarContainer
from matplotlib.figure import Figure

import analyze
from lib.ablate.plan import load_plan, parse_plan
from lib.analyze.charts import CHART_PIXELS, analysis_figure
from lib.analyze.plan_suggestion import ALIGNMENT_THRESHOLD, PlanSuggestion, plan_yaml, suggest_plan
from lib.analyze.signal_metrics import SignalReport, analyze_measurements
from lib.core.errors import UserError, run_cli
from lib.measure.measurements import load_measurements
from tests.conftest import FixtureFactory
from tests.filesystems import small_tmpfs
from tests.measurement_files import HIDDEN_SIZE, planted_measurements, save, unit
from tests.scripts import IN_PROCESS_AND_AS_A_PROCESS, run_script

REPOSITORY = Path(__file__).resolve().parents[1]

# Residual layers 0..12 (N = 12). The signal peaks at layer 5; the alignments with the planted
# direction decide the edited range by hand: decoder layer l writes residual l + 1, so starting
# from layer 4 (writes 5), layers 3, 2 (alignments 0.9, 0.55 of residuals 4, 3) join, layer 1
# (0.3) stops the run below; layers 5, 6, 7 (0.95, 0.7, 0.52) join, layer 8 (0.4) stops it above.
# Residuals 10..12 are aligned again but not contiguous with the run.
PEAK_LAYER = 5
MAGNITUDES = [0.0, 1.0, 2.0, 3.0, 5.0, 8.0, 6.0, 4.0, 3.0, 2.0, 1.0, 1.0, 1.0]
ALIGNMENTS = [1.0, 0.1, 0.3, 0.55, 0.9, 1.0, 0.95, 0.7, 0.52, 0.4, 0.8, 0.9, 0.9]
EXPECTED_EDITED_LAYERS = [2, 3, 4, 5, 6, 7]
SEARCH_POINTER = "python search.py --model MODEL --measurements M.pt --plan PLAN.yml --output EDITED_DIR"
EVALUATE_POINTER = "python evaluate.py --model MODEL --plan PLAN.yml"


def run_analyze(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """Run the CLI in-process exactly as `python analyze.py ...` does; return (status, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(analyze.main, argv)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def hand_built_file(path: Path) -> Path:
    """Layer 0: identical means. Layer 1: orthogonal means 3e0 / 4e1. Layer 2: a rotated direction."""
    variance_harmful = torch.full((HIDDEN_SIZE,), 7.0)  # 7 where d is zero: must not matter
    variance_harmless = torch.full((HIDDEN_SIZE,), 7.0)
    variance_harmful[:2] = torch.tensor([1.0, 2.0])
    variance_harmless[:2] = torch.tensor([3.0, 4.0])
    means = {
        0: (2 * unit(5), 2 * unit(5)),
        1: (3 * unit(0), 4 * unit(1)),
        2: (4 * unit(1) + 2 * unit(0) + 2 * unit(2), 4 * unit(1)),
    }
    content: dict[str, object] = {"layers": 2}
    for layer, (harmful, harmless) in means.items():
        refusal = harmful - harmless
        content |= {
            f"harmful_{layer}": harmful.float(),
            f"harmless_{layer}": harmless.float(),
            f"refuse_{layer}": refusal.float(),
            f"refusenorm_{layer}": (refusal / refusal.norm() if refusal.any() else refusal).float(),
            f"harmful_var_{layer}": variance_harmful,
            f"harmless_var_{layer}": variance_harmless,
        }
    return save(content, path)


def test_identical_means_give_no_signal(tmp_path: Path) -> None:
    report = analyze_measurements(load_measurements(hand_built_file(tmp_path / "m.pt")))
    identical = report.layer(0)
    assert (identical.harmful_norm, identical.harmless_norm, identical.refusal_norm) == (2.0, 2.0, 0.0)
    assert identical.cos_harmful_harmless == pytest.approx(1.0)
    assert identical.relative_magnitude == 0.0 and identical.score == 0.0
    assert identical.cos_harmful_direction is None and identical.cos_harmless_direction is None
    assert identical.purity is None and identical.separation is None and identical.cos_previous is None


def test_orthogonal_means_match_hand_computed_metrics(tmp_path: Path) -> None:
    report = analyze_measurements(load_measurements(hand_built_file(tmp_path / "m.pt")))
    layer = report.layer(1)
    # h+ = 3e0, h- = 4e1, r = (3, -4), |r| = 5, d = (0.6, -0.8)
    assert (layer.harmful_norm, layer.harmless_norm, layer.refusal_norm) == pytest.approx((3.0, 4.0, 5.0))
    assert layer.cos_harmful_harmless == pytest.approx(0.0, abs=1e-12)
    assert layer.cos_harmful_direction == pytest.approx(0.6)
    assert layer.cos_harmless_direction == pytest.approx(-0.8)
    assert layer.relative_magnitude == pytest.approx(5 / 4)
    assert layer.purity == pytest.approx(3 / 5)  # r minus its e1 component is (3, 0)
    # projected variances: harmful 1*0.36 + 2*0.64 = 1.64, harmless 3*0.36 + 4*0.64 = 3.64; pooled 2.64
    separation = 25 / 2.64
    assert layer.separation == pytest.approx(separation)
    assert layer.score == pytest.approx(5 / 4 * 3 / 5 * separation / (1 + separation))
    assert layer.cos_previous is None  # layer 0 has no direction
    rotated = report.layer(2)  # d = (1, 0, 1) / sqrt 2
    assert rotated.cos_previous == pytest.approx(0.6 / math.sqrt(2))
    assert rotated.purity == pytest.approx(1.0) and rotated.cos_harmless_direction == pytest.approx(
        0.0, abs=1e-7
    )


def test_projected_direction_uses_the_stored_unit_vector(tmp_path: Path) -> None:
    # --projected files store d orthogonalised against h-: here r = (3, -4) becomes d = e0.
    content = torch.load(hand_built_file(tmp_path / "m.pt"), weights_only=True)
    content["refusenorm_1"] = unit(0).float()
    layer = analyze_measurements(load_measurements(save(content, tmp_path / "projected.pt"))).layer(1)
    assert layer.cos_harmless_direction == pytest.approx(
        0.0
    ) and layer.cos_harmful_direction == pytest.approx(1.0)
    assert layer.separation == pytest.approx(3**2 / ((1.0 + 3.0) / 2))  # (r.d)^2 / mean of v0's
    assert layer.purity == pytest.approx(3 / 5)  # purity describes the raw vector


def test_planted_direction_is_suggested_with_its_aligned_range(tmp_path: Path) -> None:
    measurements = load_measurements(save(planted_measurements(MAGNITUDES, ALIGNMENTS), tmp_path / "m.pt"))
    report = analyze_measurements(measurements)
    assert report.has_variances
    for index, magnitude in enumerate(MAGNITUDES):
        signal = report.layer(index)
        relative = magnitude / math.hypot(10.0, magnitude)  # |h+|^2 = |h-|^2 + a^2, |h-| = 10
        separation = magnitude**2 / 4.0  # every variance is 4
        assert signal.relative_magnitude == pytest.approx(relative, rel=1e-5)
        if magnitude:
            assert signal.separation == pytest.approx(separation, rel=1e-5)
            assert signal.score == pytest.approx(relative * separation / (1 + separation), rel=1e-5)
    suggestion = suggest_plan(report, measurements.num_layers)
    assert suggestion.measurement == PEAK_LAYER
    assert suggestion.edited_layers == EXPECTED_EDITED_LAYERS
    assert all(suggestion.alignment[layer] >= ALIGNMENT_THRESHOLD for layer in EXPECTED_EDITED_LAYERS)


def test_llm_abliteration_file_has_no_separation_but_still_scores_and_suggests(tmp_path: Path) -> None:
    content = planted_measurements(MAGNITUDES, ALIGNMENTS, llm_abliteration_style=True)
    assert not any(key.startswith(("refusenorm", "harmful_var", "meta")) for key in content)
    measurements = load_measurements(save(content, tmp_path / "old.pt"))
    assert measurements.num_layers == len(MAGNITUDES)  # residuals 0..N-1
    report = analyze_measurements(measurements)
    assert not report.has_variances and all(signal.separation is None for signal in report.layers)
    peak = report.layer(PEAK_LAYER)
    assert peak.score == pytest.approx(peak.relative_magnitude * peak.purity)
    suggestion = suggest_plan(report, measurements.num_layers)
    assert (suggestion.measurement, suggestion.edited_layers) == (PEAK_LAYER, EXPECTED_EDITED_LAYERS)


def test_late_peak_is_ranked_but_not_used_for_measurement(tmp_path: Path) -> None:
    magnitudes = [0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 4.0, 3.0, 2.0, 2.0, 3.0, 12.0, 5.0]
    report = analyze_measurements(
        load_measurements(save(planted_measurements(magnitudes, ALIGNMENTS), tmp_path / "m.pt"))
    )
    suggestion = suggest_plan(report, 12)
    assert max(report.layers, key=lambda signal: signal.score).index == 11
    assert suggestion.candidates == range(1, 10)  # floor(0.8 * 12) = 9
    assert suggestion.measurement == 5


def planted_suggestion(tmp_path: Path) -> tuple[SignalReport, PlanSuggestion]:
    measurements = load_measurements(save(planted_measurements(MAGNITUDES, ALIGNMENTS), tmp_path / "m.pt"))
    report = analyze_measurements(measurements)
    return report, suggest_plan(report, measurements.num_layers)


@pytest.mark.parametrize(
    "edited_layers, runs, layer_value",
    [
        (EXPECTED_EDITED_LAYERS, [range(2, 8)], 'layer: "2-7"'),  # the heuristic's own run
        ([1, 2, 3, 6, 8, 9], [range(1, 4), range(6, 7), range(8, 10)], "layer: 6\n"),
        ([4], [range(4, 5)], "layer: 4\n"),
    ],
)
def test_each_run_of_consecutive_edited_layers_is_one_plan_entry(
    edited_layers: list[int], runs: list[range], layer_value: str, tmp_path: Path
) -> None:
    report, suggestion = planted_suggestion(tmp_path)
    suggestion = dataclasses.replace(suggestion, edited_layers=edited_layers)
    text = plan_yaml(
        suggestion,
        report,
        len(MAGNITUDES) - 1,
        model="/models/m",
        measurements=tmp_path / "m.pt",
        output="/models/m-ablated",
    )
    plan = parse_plan(yaml.safe_load(text), tmp_path / "plan.yml", text)
    assert [entry.layer_ranges for entry in plan.entries] == [(run,) for run in runs]
    assert all(entry.measurement == PEAK_LAYER for entry in plan.entries)
    assert layer_value in text
    for layer in edited_layers:  # every layer's alignment stays readable, as a comment
        assert f"{layer}: {suggestion.alignment[layer]:.3g}" in text


def test_table_and_json_report_every_layer(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = save(
        planted_measurements(MAGNITUDES, ALIGNMENTS, llm_abliteration_style=True), tmp_path / "old.pt"
    )
    status, table, _ = run_analyze([str(path)], capsys)
    assert status == 0
    rows = [line.split() for line in table.splitlines() if line.split() and line.split()[0].isdigit()]
    assert [int(row[0]) for row in rows] == list(range(len(MAGNITUDES)))
    assert rows[PEAK_LAYER][-1] == "*1" and all(row[8] == "n/a" for row in rows)
    status, printed, _ = run_analyze([str(path), "--json"], capsys)
    data = json.loads(printed)
    expected = analyze_measurements(load_measurements(path))
    assert status == 0 and data["best_layers"][0] == PEAK_LAYER and data["has_variances"] is False
    assert [layer["score"] for layer in data["layers"]] == [signal.score for signal in expected.layers]
    assert data["suggestion"]["edited_layers"] == EXPECTED_EDITED_LAYERS
    assert data["direction_cosines"][0][0] is None  # layer 0 has no direction
    assert data["direction_cosines"][PEAK_LAYER][PEAK_LAYER] == pytest.approx(1.0)


def run_analyze_then_check(arguments: list[str], check: str, environment: dict[str, str]) -> None:
    """Run analyze.main in a fresh interpreter (its own matplotlib backend), then the Python line
    `check`; both must succeed."""
    script = f"import sys, analyze\nstatus = analyze.main(sys.argv[1:])\n{check}\nsys.exit(status)\n"
    result = subprocess.run(
        [sys.executable, "-c", script, *arguments],
        cwd=REPOSITORY,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.slow  # its own python process (no display, pyplot never imported): seconds
def test_chart_is_a_png_of_the_documented_size_without_a_display(tmp_path: Path) -> None:
    path = save(planted_measurements(MAGNITUDES, ALIGNMENTS), tmp_path / "m.pt")
    # An interactive backend and no display: any attempt to open a window would fail, and pyplot
    # (the only way to open one) must not even be imported.
    environment = {
        key: value for key, value in os.environ.items() if key not in ("DISPLAY", "WAYLAND_DISPLAY")
    }
    environment["MPLBACKEND"] = "TkAgg"
    run_analyze_then_check(
        [str(path), "--chart"],
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'",
        environment,
    )
    assert_documented_chart_beside_the_measurements(tmp_path)


def assert_documented_chart_beside_the_measurements(directory: Path) -> None:
    chart = directory / "m.png"  # default: beside the measurements
    assert chart.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    pixels = matplotlib_image.imread(chart)
    assert pixels.shape[:2] == (CHART_PIXELS[1], CHART_PIXELS[0])
    assert pixels[..., :3].std() > 0.05  # something was drawn
    assert sorted(entry.name for entry in directory.iterdir()) == ["m.png", "m.pt"]  # no temporary left


def test_chart_written_in_process_is_a_png_of_the_documented_size(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The quick variant of the test above, for the fast tier: the same chart, without its own process."""
    path = save(planted_measurements(MAGNITUDES, ALIGNMENTS), tmp_path / "m.pt")
    status, _, error = run_analyze([str(path), "--chart"], capsys)
    assert status == 0, error
    assert_documented_chart_beside_the_measurements(tmp_path)


def drawn_chart(tmp_path: Path) -> Figure:
    report, suggestion = planted_suggestion(tmp_path)
    figure = analysis_figure(report, suggestion, "planted")
    figure.canvas.draw()
    return figure


def test_chart_legends_never_cover_an_axes(tmp_path: Path) -> None:
    figure = drawn_chart(tmp_path)
    renderer = figure.canvas.get_renderer()
    legends = [*figure.legends, *(legend for panel in figure.subfigs for legend in panel.legends)]
    assert len(legends) == 7  # one per panel, and one key for the marks the panels share
    assert len(figure.axes) == 8  # six panels, the separation's right axis, the heatmap's colour bar
    # Each axes' tight box: its plotting area with the ticks, labels and title around it.
    axes_boxes = [axes.get_tightbbox(renderer) for axes in figure.axes]
    legend_boxes = [legend.get_window_extent(renderer) for legend in legends]
    for box in legend_boxes:
        assert figure.bbox.x0 <= box.x0 and box.x1 <= figure.bbox.x1
        assert figure.bbox.y0 <= box.y0 and box.y1 <= figure.bbox.y1
        assert not any(box.overlaps(axes_box) for axes_box in axes_boxes)
    assert not any(
        box.overlaps(other) for index, box in enumerate(legend_boxes) for other in legend_boxes[:index]
    )


def test_chart_shades_edited_layers_at_the_residuals_they_write_unlike_the_bars(tmp_path: Path) -> None:
    figure = drawn_chart(tmp_path)
    score_axes = next(axes for axes in figure.axes if axes.containers)
    bars = [
        bar for container in score_axes.containers if isinstance(container, BarContainer) for bar in container
    ]
    bar_colours = {
        colors.to_rgba(colour) for bar in bars for colour in (bar.get_facecolor(), bar.get_edgecolor())
    }
    shadings = [patch for patch in score_axes.patches if patch not in bars]
    assert len(bars) == len(MAGNITUDES) and len(shadings) == 2  # edited layers, not considered
    # Hatched bands in colours no bar has: a shading cannot pass for a bar.
    assert not any(bar.get_hatch() for bar in bars) and all(shading.get_hatch() for shading in shadings)
    shading_colours = {
        colors.to_rgba(c) for shading in shadings for c in (shading.get_facecolor(), shading.get_edgecolor())
    }
    assert shading_colours.isdisjoint(bar_colours)
    spans = sorted(
        tuple(shading.get_path().transformed(shading.get_patch_transform()).get_extents().intervalx)
        for shading in shadings
    )
    # decoder layers 2..7 write residuals 3..8; residuals 10..12 lie beyond floor(0.8 * 12) = 9
    assert spans == [pytest.approx((2.5, 8.5)), pytest.approx((9.5, 12.5))]
    key = " ".join(text.get_text() for text in figure.legends[0].get_texts())
    assert "edited decoder layers 2-7, shaded at the residuals 3-8 they write" in key
    assert score_axes.get_xlabel().startswith("residual L: stream entering decoder layer L")


def test_chart_on_a_full_disk_is_one_line_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = save(planted_measurements(MAGNITUDES, ALIGNMENTS), tmp_path / "m.pt")
    with small_tmpfs(tmp_path / "small", 64 << 10) as small:  # the chart is a few hundred KB
        chart = small / "chart.png"
        status, _, error = run_analyze([str(path), "--chart", str(chart)], capsys)
        assert status == 2
        assert error.splitlines() == [
            f"error: {chart}: no space left on device while writing; free some space or write elsewhere, "
            "then run again"
        ]
        assert list(small.iterdir()) == []  # no partial chart, no temporary


@pytest.mark.slow  # analyze.py as its own process: seconds
def test_output_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """`analyze.py --json | head` once head has read enough: no BrokenPipeError traceback."""
    path = save(planted_measurements(MAGNITUDES, ALIGNMENTS), tmp_path / "m.pt")
    process = subprocess.Popen(
        [sys.executable, "analyze.py", str(path), "--json"],
        cwd=REPOSITORY,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    process.stdout.close()  # the reader is gone before the first byte is written
    error = process.stderr.read()
    assert process.wait(timeout=120) == 1
    assert error == b""


@pytest.mark.slow  # its own python process (pyplot): seconds
def test_show_goes_through_pyplot_and_writes_nothing(tmp_path: Path) -> None:
    path = save(planted_measurements(MAGNITUDES, ALIGNMENTS), tmp_path / "m.pt")
    environment = {**os.environ, "MPLBACKEND": "Agg"}  # non-interactive: show() returns at once
    run_analyze_then_check(
        [str(path), "--show"],
        "from matplotlib import pyplot\n"
        "assert len(pyplot.figure(1).axes) > 6, 'the chart was not drawn on a pyplot figure'",
        environment,
    )
    assert [entry.name for entry in tmp_path.iterdir()] == ["m.pt"]


def suggest_for_fixture(
    tiny_model: FixtureFactory, tmp_path: Path, capsys: pytest.CaptureFixture
) -> tuple[Path, Path, str]:
    """A 4-layer llama fixture, a plan suggested from a matching synthetic file (peak at 2), stdout."""
    model = tiny_model("llama")
    measurements = save(
        planted_measurements([0.0, 2.0, 5.0, 3.0, 1.0], [1.0, 0.8, 1.0, 0.9, 0.2]), tmp_path / "m.pt"
    )
    plan = tmp_path / "plan.yml"
    status, printed, error = run_analyze(
        [
            str(measurements),
            "--suggest",
            str(plan),
            "--model",
            str(model),
            "--output",
            str(tmp_path / "ablated"),
        ],
        capsys,
    )
    assert status == 0, error
    return model, plan, printed


def test_suggested_plan_is_valid_commented_yaml(
    tiny_model: FixtureFactory, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    model, plan, _ = suggest_for_fixture(tiny_model, tmp_path, capsys)
    text = plan.read_text()
    parsed = yaml.safe_load(text)
    assert set(parsed) == {"model", "measurements", "output", "scale", "ablate"}
    assert Path(parsed["model"]) == model.resolve() and Path(parsed["measurements"]).is_file()
    assert Path(parsed["output"]).is_absolute() and parsed["scale"] == 1.0
    # decoder layers 0, 1, 2 write residuals 1, 2, 3 (alignments 0.8, 1, 0.9); layer 3 writes 4 (0.2):
    # one run, so one entry with a range
    assert parsed["ablate"] == [{"layer": "0-2", "measurement": 2, "scale": 1.0, "sparsity": 1.0}]
    assert [entry.layer_ranges for entry in load_plan(plan).entries] == [(range(3),)]
    assert "score" in text and "separation S" in text and "cos >= 0.5" in text  # the numbers behind it
    assert "0: 0.8, 1: 1, 2: 0.9" in text  # each edited layer's alignment, as a comment
    status, _, error = run_analyze(
        [
            str(tmp_path / "m.pt"),
            "--suggest",
            str(plan),
            "--model",
            str(model),
            "--output",
            str(tmp_path / "other"),
        ],
        capsys,
    )
    assert status == 2 and "already exists" in error and plan.read_text() == text


def test_suggestion_says_it_is_unverified_and_points_to_search(
    tiny_model: FixtureFactory, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _, plan, printed = suggest_for_fixture(tiny_model, tmp_path, capsys)
    header = [line.removeprefix("# ") for line in plan.read_text().splitlines() if line.startswith("#")]
    for shown in ("\n".join(header), printed):
        assert "Unverified: a heuristic from the measurements alone, not checked with forward passes" in shown
        assert SEARCH_POINTER in shown and EVALUATE_POINTER in shown
    assert printed.index("suggested: direction measured at layer 2") < printed.index("Unverified")


@IN_PROCESS_AND_AS_A_PROCESS
def test_suggested_plan_passes_sharded_ablate_dry_run(
    tiny_model: FixtureFactory, tmp_path: Path, capsys: pytest.CaptureFixture, as_a_process: bool
) -> None:
    _, plan, _ = suggest_for_fixture(tiny_model, tmp_path, capsys)
    result = run_script("sharded_ablate", [str(plan), "--dry-run"], capsys, as_a_process=as_a_process)
    assert result.status == 0, result.err
    assert not (tmp_path / "ablated").exists()


def test_suggest_refuses_a_model_with_another_layer_count(
    tiny_model: FixtureFactory, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    measurements = save(planted_measurements(MAGNITUDES, ALIGNMENTS), tmp_path / "m.pt")  # 12 layers
    status, _, error = run_analyze(
        [
            str(measurements),
            "--suggest",
            str(tmp_path / "plan.yml"),
            "--model",
            str(tiny_model("llama")),
            "--output",
            str(tmp_path / "out"),
        ],
        capsys,
    )
    assert status == 2 and "num_hidden_layers=4" in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "plan.yml").exists()


def _without_layer(content: dict, layer: int) -> dict:
    return {key: value for key, value in content.items() if not key.endswith(f"_{layer}")}


def _with(content: dict, key: object, value: object) -> dict:
    return {**content, key: value}


class _OpensAFile:
    """Unpickling this with weights_only=False would create `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


GOOD = planted_measurements(MAGNITUDES, ALIGNMENTS)
NAN_VECTOR = torch.ones(HIDDEN_SIZE)
NAN_VECTOR[3] = math.nan
BAD_FILES = {
    "not a torch file": (b"layer,score\n1,0.5\n", "not a measurement file"),
    "a list": ([torch.ones(3)], "not a measurement file"),
    "missing layer": (_without_layer(GOOD, 4), "missing layer(s) 4"),
    "layer beyond N": (_with(GOOD, "refuse_14", torch.ones(HIDDEN_SIZE)), "'layers' is 12"),
    "NaN vector": (_with(GOOD, "harmful_3", NAN_VECTOR), "'harmful_3' contains NaN"),
    "negative variance": (_with(GOOD, "harmless_var_2", -torch.ones(HIDDEN_SIZE)), "negative"),
    "wrong size inside a layer": (_with(GOOD, "harmful_var_2", torch.ones(8)), "different sizes"),
    "no means": ({key: value for key, value in GOOD.items() if not key.startswith("harm")}, "means"),
    "arbitrary object": (_with(GOOD, "meta", {"path": Path("/")}), "Unsupported global: GLOBAL pathlib"),
    # torch.load's own failures on odd bytes (KeyError, IndexError, UnicodeDecodeError, ...) and odd dicts
    "plain text": (b"hello world\n", "not a measurement file (expected a torch.save'd dict of plain tensors"),
    "key that is not a string": (_with(GOOD, 7, torch.ones(HIDDEN_SIZE)), "key 7 is not a string"),
    "'layers' is a bool": (_with(GOOD, "layers", True), "'layers' must be a positive integer, got True"),
    "'layers' is a float tensor": (_with(GOOD, "layers", torch.tensor(12.5)), "'layers' must be a positive"),
    "'layers' is a complex tensor": (
        _with(GOOD, "layers", torch.tensor(12 + 1j)),
        "'layers' must be a positive",
    ),
    "complex vector": (
        _with(GOOD, "refuse_3", torch.ones(HIDDEN_SIZE, dtype=torch.complex64)),
        "'refuse_3' must be a floating-point tensor, got torch.complex64",
    ),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_input_is_one_line_and_status_2(name: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    content, message = BAD_FILES[name]
    path = tmp_path / "bad.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    status, out, error = run_analyze([str(path), "--chart"], capsys)
    assert status == 2 and out == ""
    assert error.startswith("error: ") and len(error.strip().splitlines()) == 1 and message in error
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["bad.pt"]  # no chart, no temporary


def test_a_directory_is_not_a_measurement_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "m.pt").mkdir()
    status, _, error = run_analyze([str(tmp_path / "m.pt")], capsys)
    assert status == 2
    assert error == f"error: {tmp_path / 'm.pt'}: not a regular file (expected a .pt measurement file)\n"


def test_pickle_is_never_executed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pt"
    torch.save(_with(GOOD, "meta", _OpensAFile(marker)), path)
    status, _, error = run_analyze([str(path)], capsys)
    assert status == 2 and "not a measurement file" in error
    assert not marker.exists()  # weights_only=True refused it before running anything
    torch.load(path, weights_only=False)  # the same file, loaded unsafely, does run code
    assert marker.exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--chart", "chart.jpg"], "must be a .png path"),
        (["--chart", "/nonexistent-directory/chart.png"], "does not exist"),
    ],
)
def test_bad_flags_are_one_line_errors(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = save(GOOD, tmp_path / "m.pt")
    status, _, error = run_analyze([str(path), *extra], capsys)
    assert status == 2 and message in error and len(error.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "extra", [["--suggest", "plan.yml"], ["--model", "x"], ["--suggest", "p.yml", "--output", "o"]]
)
def test_suggest_flags_come_together(extra: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    status, _, error = run_analyze([str(save(GOOD, tmp_path / "m.pt")), *extra], capsys)
    assert status == 2 and "--suggest" in error


def test_zero_direction_layers_load_but_cannot_be_used_for_ablation(tmp_path: Path) -> None:
    measurements = load_measurements(save(GOOD, tmp_path / "m.pt"))
    assert not measurements.layer(0).has_direction and measurements.layer(1).has_direction
    with pytest.raises(UserError, match="layer 0 has no refusal direction"):
        measurements.direction(0)
