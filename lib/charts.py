"""The analysis chart: six panels of per-layer metrics with the suggested layers marked.

Drawing uses matplotlib's object-oriented `Figure` and the Agg canvas, so writing a PNG never
touches pyplot or a display; only `show_chart` (analyze.py --show) goes through pyplot.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from lib.atomic import atomic_file
from lib.errors import writing
from lib.plan_suggestion import ALIGNMENT_THRESHOLD, PlanSuggestion, best_layers
from lib.signal_metrics import SignalReport

FIGURE_INCHES = (16.0, 15.0)
DOTS_PER_INCH = 100
# (width, height) of the PNG in pixels: no tight bounding box, so the size never depends on the data.
CHART_PIXELS = (int(FIGURE_INCHES[0] * DOTS_PER_INCH), int(FIGURE_INCHES[1] * DOTS_PER_INCH))
LAYER_AXIS_LABEL = "layer L (residual stream entering decoder layer L)"


def _series(report: SignalReport, field: str) -> np.ndarray:
    """A metric across layers as floats, NaN where it is n/a (matplotlib leaves a gap)."""
    return np.array(
        [np.nan if (value := getattr(signal, field)) is None else value for signal in report.layers],
        dtype=float,
    )


def _mark_suggestion(axes: Axes, suggestion: PlanSuggestion | None) -> None:
    if suggestion is None:
        return
    first, last = suggestion.edited_layers[0], suggestion.edited_layers[-1]
    # Decoder layer l sits between residual l and l + 1, so layers first..last span [first, last + 1].
    axes.axvspan(
        first,
        last + 1,
        color="gold",
        alpha=0.18,
        label=f"edited decoder layers {first}..{last} (residuals {first}..{last + 1})",
    )
    axes.axvline(
        suggestion.measurement,
        color="black",
        linestyle="--",
        linewidth=1.2,
        label=f"measurement layer {suggestion.measurement}",
    )


def _finish(axes: Axes, title: str, ylabel: str, layers: np.ndarray, legend: bool = True) -> None:
    axes.set_title(title, fontsize=12, fontweight="bold")
    axes.set_xlabel(LAYER_AXIS_LABEL)
    axes.set_ylabel(ylabel)
    axes.set_xlim(layers[0] - 0.5, layers[-1] + 0.5)
    axes.grid(True, alpha=0.3)
    if legend:
        axes.legend(fontsize=8, loc="best")


def _plot_norms(
    axes: Axes, report: SignalReport, layers: np.ndarray, suggestion: PlanSuggestion | None
) -> None:
    axes.plot(layers, _series(report, "harmful_norm"), "r-o", markersize=3, label="|harmful mean|")
    axes.plot(layers, _series(report, "harmless_norm"), "g-s", markersize=3, label="|harmless mean|")
    axes.plot(
        layers, _series(report, "refusal_norm"), "b-^", markersize=3, label="|refusal| = |harmful - harmless|"
    )
    _mark_suggestion(axes, suggestion)
    _finish(axes, "Norms of the means and of the refusal vector", "L2 norm", layers)


def _plot_cosines(
    axes: Axes, report: SignalReport, layers: np.ndarray, suggestion: PlanSuggestion | None
) -> None:
    axes.plot(
        layers,
        _series(report, "cos_harmful_harmless"),
        color="purple",
        marker="o",
        markersize=3,
        label="cos(harmful, harmless)",
    )
    axes.plot(
        layers,
        _series(report, "cos_harmful_direction"),
        color="red",
        marker="o",
        markersize=3,
        label="cos(harmful, direction)",
    )
    axes.plot(
        layers,
        _series(report, "cos_harmless_direction"),
        color="blue",
        marker="o",
        markersize=3,
        label="cos(harmless, direction)",
    )
    axes.axhline(0.0, color="gray", linewidth=0.8)
    _mark_suggestion(axes, suggestion)
    _finish(axes, "Cosine similarities", "cosine", layers)


def _plot_separation(
    axes: Axes, report: SignalReport, layers: np.ndarray, suggestion: PlanSuggestion | None
) -> None:
    axes.plot(
        layers,
        _series(report, "relative_magnitude"),
        color="darkorange",
        marker="d",
        markersize=3,
        label="relative magnitude |refusal| / max |mean|",
    )
    axes.plot(
        layers,
        _series(report, "purity"),
        color="darkgreen",
        marker="d",
        markersize=3,
        label="purity (share orthogonal to harmless)",
    )
    _mark_suggestion(axes, suggestion)
    separation = _series(report, "separation")
    has_separation = not np.isnan(separation).all()
    title = "Relative magnitude, purity and separation" + (
        "" if has_separation else " (n/a: no variances in file)"
    )
    _finish(axes, title, "ratio", layers, legend=False)
    axes.set_ylim(bottom=0.0, top=max(1.0, float(np.nanmax(_series(report, "relative_magnitude")))) * 1.35)
    handles = axes.get_legend_handles_labels()[0]
    if has_separation:
        separation_axes = axes.twinx()
        separation_axes.plot(
            layers,
            separation,
            color="teal",
            linestyle=":",
            marker="x",
            markersize=4,
            label="separation (right axis)",
        )
        separation_axes.set_ylim(bottom=0.0, top=float(np.nanmax(separation)) * 1.35 or 1.0)
        separation_axes.set_ylabel("separation: (mean difference)² / pooled variance along d")
        handles += separation_axes.get_legend_handles_labels()[0]
    # One legend for both y axes, in the headroom left above the curves.
    axes.legend(handles=handles, fontsize=8, loc="upper right", ncol=2)


def _plot_score(
    axes: Axes, report: SignalReport, layers: np.ndarray, suggestion: PlanSuggestion | None
) -> None:
    scores = _series(report, "score")
    axes.bar(layers, scores, color="lightsteelblue", edgecolor="steelblue", label="signal-quality score")
    for rank, index in enumerate(best_layers(report), start=1):
        axes.annotate(
            f"#{rank}",
            (index, scores[index]),
            textcoords="offset points",
            xytext=(0, 4),
            ha="center",
            fontsize=9,
            fontweight="bold",
        )
    if suggestion is not None:
        skipped_from = suggestion.candidates.stop
        if skipped_from <= layers[-1]:
            axes.axvspan(
                skipped_from - 0.5,
                layers[-1] + 0.5,
                color="gray",
                alpha=0.12,
                label="not considered for measurement",
            )
    _mark_suggestion(axes, suggestion)
    title = "Signal quality: rel. magnitude x purity" + (" x S/(1+S)" if report.has_variances else "")
    _finish(axes, title, "score", layers)
    axes.set_ylim(bottom=0.0, top=max(float(np.nanmax(scores)), 1e-12) * 1.2)


def _plot_rotation(
    axes: Axes, report: SignalReport, layers: np.ndarray, suggestion: PlanSuggestion | None
) -> None:
    axes.plot(
        layers,
        _series(report, "cos_previous"),
        color="navy",
        marker="o",
        markersize=3,
        label="cos(direction, previous layer's direction)",
    )
    if suggestion is not None:
        axes.plot(
            layers,
            report.direction_cosines[:, suggestion.measurement],
            color="crimson",
            marker="o",
            markersize=3,
            label=f"cos(direction, layer {suggestion.measurement}'s direction)",
        )
        axes.axhline(
            ALIGNMENT_THRESHOLD,
            color="crimson",
            linestyle=":",
            linewidth=1,
            label=f"edit threshold {ALIGNMENT_THRESHOLD}",
        )
    axes.axhline(0.0, color="gray", linewidth=0.8)
    _mark_suggestion(axes, suggestion)
    _finish(axes, "Rotation of the direction between layers", "cosine", layers)


def _plot_heatmap(
    figure: Figure, axes: Axes, report: SignalReport, suggestion: PlanSuggestion | None
) -> None:
    matrix = np.ma.masked_invalid(report.direction_cosines)
    image = axes.imshow(
        matrix, cmap="coolwarm", vmin=-1.0, vmax=1.0, origin="lower", interpolation="nearest", aspect="auto"
    )
    figure.colorbar(image, ax=axes, label="cosine similarity of the directions")
    if suggestion is not None:
        axes.axhline(suggestion.measurement, color="black", linestyle="--", linewidth=1)
        axes.axvline(
            suggestion.measurement,
            color="black",
            linestyle="--",
            linewidth=1,
            label=f"measurement layer {suggestion.measurement}",
        )
        # The cells that decided the edited range: the outputs (l + 1) of the edited decoder layers.
        first, last = suggestion.edited_layers[0], suggestion.edited_layers[-1]
        axes.add_patch(
            Rectangle(
                (first + 0.5, suggestion.measurement - 0.5),
                last - first + 1,
                1.0,
                fill=False,
                edgecolor="gold",
                linewidth=2.5,
                label=f"outputs of edited layers {first}..{last}",
            )
        )
        axes.legend(fontsize=8, loc="upper left")
    axes.set_title("Direction cosine similarity, layer by layer", fontsize=12, fontweight="bold")
    axes.set_xlabel("layer L (blank: no direction at that layer)")
    axes.set_ylabel("layer L")


def draw_analysis(
    figure: Figure, report: SignalReport, suggestion: PlanSuggestion | None, title: str
) -> None:
    layers = np.array([signal.index for signal in report.layers])
    grid = figure.subplots(3, 2)
    _plot_norms(grid[0, 0], report, layers, suggestion)
    _plot_cosines(grid[0, 1], report, layers, suggestion)
    _plot_separation(grid[1, 0], report, layers, suggestion)
    _plot_score(grid[1, 1], report, layers, suggestion)
    _plot_rotation(grid[2, 0], report, layers, suggestion)
    _plot_heatmap(figure, grid[2, 1], report, suggestion)
    figure.suptitle(title, fontsize=15, fontweight="bold")


def save_chart(report: SignalReport, suggestion: PlanSuggestion | None, title: str, path: Path) -> None:
    """Render headlessly (Agg) and write the PNG atomically."""
    figure = Figure(figsize=FIGURE_INCHES, dpi=DOTS_PER_INCH, layout="constrained")
    FigureCanvasAgg(figure)
    draw_analysis(figure, report, suggestion, title)
    with writing(path), atomic_file(path) as temporary:
        figure.savefig(temporary, format="png", dpi=DOTS_PER_INCH)


def show_chart(report: SignalReport, suggestion: PlanSuggestion | None, title: str) -> None:
    """Open the chart in a window (only on request: this needs a display)."""
    from matplotlib import pyplot

    figure = pyplot.figure(figsize=FIGURE_INCHES, layout="constrained")
    draw_analysis(figure, report, suggestion, title)
    pyplot.show()
