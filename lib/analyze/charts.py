"""The analysis chart: six panels of per-layer metrics with the suggested layers marked.

The x axis is the residual index L of SPEC §2 (the stream entering decoder layer L). Decoder layer l
writes residual l + 1, so the edited decoder layers are shaded at the residuals they write. Every
legend sits in a margin the constrained layout reserves below its panel (or below all panels for the
marks they share), never over the data.

Drawing uses matplotlib's object-oriented `Figure` and the Agg canvas, so writing a PNG never
touches pyplot or a display; only `show_chart` (analyze.py --show) goes through pyplot.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure, SubFigure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from lib.ablate.plan import format_layers
from lib.analyze.plan_suggestion import ALIGNMENT_THRESHOLD, PlanSuggestion, best_layers
from lib.analyze.signal_metrics import SignalReport
from lib.core.atomic import atomic_file

FIGURE_INCHES = (16.0, 17.0)
DOTS_PER_INCH = 100
# (width, height) of the PNG in pixels: no tight bounding box, so the size never depends on the data.
CHART_PIXELS = (int(FIGURE_INCHES[0] * DOTS_PER_INCH), int(FIGURE_INCHES[1] * DOTS_PER_INCH))
# SPEC §2: index L is the residual stream entering decoder layer L, which decoder layer L - 1 wrote.
RESIDUAL_AXIS_LABEL = (
    "residual L: stream entering decoder layer L, written by decoder layer L-1 (0: embeddings)"
)
LEGEND_FONT_SIZE = 8
# Hatched light bands with edges: never mistaken for the score bars (lightsteelblue, no hatch).
EDITED_SHADING = {
    "facecolor": (1.0, 0.84, 0.0, 0.10),
    "edgecolor": (0.72, 0.53, 0.04, 0.6),  # darkgoldenrod, light enough for the curves on top
    "hatch": "/",
    "linewidth": 1.0,
    "zorder": 0,
}
NOT_CONSIDERED_SHADING = {
    "facecolor": (0.5, 0.5, 0.5, 0.08),
    "edgecolor": (0.41, 0.41, 0.41, 0.6),  # dimgray
    "hatch": "\\",
    "linewidth": 1.0,
    "zorder": 0,
}
MEASUREMENT_LINE = {"color": "black", "linestyle": "--", "linewidth": 1.2}
SCORE_BARS = {"color": "lightsteelblue", "edgecolor": "steelblue"}


def _series(report: SignalReport, field: str) -> np.ndarray:
    """A metric across layers as floats, NaN where it is n/a (matplotlib leaves a gap)."""
    return np.array(
        [np.nan if (value := getattr(signal, field)) is None else value for signal in report.layers],
        dtype=float,
    )


def _written_residuals(suggestion: PlanSuggestion) -> range:
    """Decoder layer l writes residual l + 1: the residual indices the edited layers write."""
    return range(suggestion.edited_layers[0] + 1, suggestion.edited_layers[-1] + 2)


def _edited_label(suggestion: PlanSuggestion) -> str:
    return (
        f"edited decoder layers {format_layers(suggestion.edited_layers)}, shaded at the residuals "
        f"{format_layers(_written_residuals(suggestion))} they write (decoder layer l writes residual l+1)"
    )


def _measurement_label(suggestion: PlanSuggestion) -> str:
    return f"measurement: the direction at residual {suggestion.measurement}"


def _mark_suggestion(axes: Axes, suggestion: PlanSuggestion | None) -> None:
    """Unlabelled: the figure's key explains these marks once, for every panel."""
    if suggestion is None:
        return
    written = _written_residuals(suggestion)
    axes.axvspan(written.start - 0.5, written.stop - 0.5, **EDITED_SHADING)
    axes.axvline(suggestion.measurement, **MEASUREMENT_LINE)


def _suggestion_key(figure: Figure, suggestion: PlanSuggestion | None) -> None:
    """One legend for the marks every panel shares, below all panels."""
    if suggestion is None:
        return
    handles = [
        Rectangle((0, 0), 1, 1, **EDITED_SHADING, label=_edited_label(suggestion)),
        Line2D([], [], **MEASUREMENT_LINE, label=_measurement_label(suggestion)),
    ]
    figure.legend(
        handles=handles,
        loc="outside lower center",
        ncol=2,
        fontsize=LEGEND_FONT_SIZE + 2,
        title="suggested plan (an unverified heuristic)",
    )


def _panel_legend(panel: SubFigure, handles: list[Artist]) -> None:
    """Below the panel's axes, in a margin the constrained layout reserves: never over the data."""
    if not handles:
        return
    panel.legend(handles=handles, loc="outside lower center", ncol=2, fontsize=LEGEND_FONT_SIZE)


def _finish(panel: SubFigure, axes: Axes, title: str, ylabel: str, layers: np.ndarray, *twins: Axes) -> None:
    """Title, labels and limits of a panel over the residual axis; one legend for `axes` and its twins."""
    axes.set_title(title, fontsize=12, fontweight="bold")
    axes.set_xlabel(RESIDUAL_AXIS_LABEL)
    axes.set_ylabel(ylabel)
    axes.set_xlim(layers[0] - 0.5, layers[-1] + 0.5)
    axes.grid(True, alpha=0.3)
    _panel_legend(
        panel, [handle for each in (axes, *twins) for handle in each.get_legend_handles_labels()[0]]
    )


def _plot_norms(
    panel: SubFigure, report: SignalReport, layers: np.ndarray, suggestion: PlanSuggestion | None
) -> None:
    axes = panel.subplots()
    axes.plot(layers, _series(report, "harmful_norm"), "r-o", markersize=3, label="|harmful mean|")
    axes.plot(layers, _series(report, "harmless_norm"), "g-s", markersize=3, label="|harmless mean|")
    axes.plot(
        layers, _series(report, "refusal_norm"), "b-^", markersize=3, label="|refusal| = |harmful - harmless|"
    )
    _mark_suggestion(axes, suggestion)
    _finish(panel, axes, "Norms of the means and of the refusal vector", "L2 norm", layers)


def _plot_cosines(
    panel: SubFigure, report: SignalReport, layers: np.ndarray, suggestion: PlanSuggestion | None
) -> None:
    axes = panel.subplots()
    for field, color, label in (
        ("cos_harmful_harmless", "purple", "cos(harmful, harmless)"),
        ("cos_harmful_direction", "red", "cos(harmful, direction)"),
        ("cos_harmless_direction", "blue", "cos(harmless, direction)"),
    ):
        axes.plot(layers, _series(report, field), color=color, marker="o", markersize=3, label=label)
    axes.axhline(0.0, color="gray", linewidth=0.8)
    _mark_suggestion(axes, suggestion)
    _finish(panel, axes, "Cosine similarities", "cosine", layers)


def _plot_separation(
    panel: SubFigure, report: SignalReport, layers: np.ndarray, suggestion: PlanSuggestion | None
) -> None:
    axes = panel.subplots()
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
    axes.set_ylim(bottom=0.0, top=max(1.0, float(np.nanmax(_series(report, "relative_magnitude")))) * 1.05)
    separation = _series(report, "separation")
    has_separation = not np.isnan(separation).all()
    twins = []
    if has_separation:
        separation_axes = axes.twinx()
        twins.append(separation_axes)
        separation_axes.plot(
            layers,
            separation,
            color="teal",
            linestyle=":",
            marker="x",
            markersize=4,
            label="separation (right axis)",
        )
        separation_axes.set_ylim(bottom=0.0, top=float(np.nanmax(separation)) * 1.05 or 1.0)
        separation_axes.set_ylabel("separation: (mean difference)² / pooled variance along d")
    title = "Relative magnitude, purity and separation" + (
        "" if has_separation else " (n/a: no variances in file)"
    )
    _finish(panel, axes, title, "ratio", layers, *twins)


def _plot_score(
    panel: SubFigure, report: SignalReport, layers: np.ndarray, suggestion: PlanSuggestion | None
) -> None:
    axes = panel.subplots()
    scores = _series(report, "score")
    axes.bar(layers, scores, **SCORE_BARS, label="signal-quality score")
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
    if suggestion is not None and suggestion.candidates.stop <= layers[-1]:
        skipped = range(suggestion.candidates.stop, int(layers[-1]) + 1)
        axes.axvspan(
            skipped.start - 0.5,
            skipped.stop - 0.5,
            **NOT_CONSIDERED_SHADING,
            label=f"residuals {format_layers(skipped)}: not considered for measurement",
        )
    _mark_suggestion(axes, suggestion)
    title = "Signal quality: rel. magnitude x purity" + (" x S/(1+S)" if report.has_variances else "")
    _finish(panel, axes, title, "score", layers)
    axes.set_ylim(bottom=0.0, top=max(float(np.nanmax(scores)), 1e-12) * 1.2)


def _plot_rotation(
    panel: SubFigure, report: SignalReport, layers: np.ndarray, suggestion: PlanSuggestion | None
) -> None:
    axes = panel.subplots()
    axes.plot(
        layers,
        _series(report, "cos_previous"),
        color="navy",
        marker="o",
        markersize=3,
        label="cos(direction at L, direction at L-1)",
    )
    if suggestion is not None:
        axes.plot(
            layers,
            report.direction_cosines[:, suggestion.measurement],
            color="crimson",
            marker="o",
            markersize=3,
            label=f"cos(direction at L, direction at residual {suggestion.measurement})",
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
    _finish(panel, axes, "Rotation of the direction between layers", "cosine", layers)


def _plot_heatmap(panel: SubFigure, report: SignalReport, suggestion: PlanSuggestion | None) -> None:
    axes = panel.subplots()
    matrix = np.ma.masked_invalid(report.direction_cosines)
    image = axes.imshow(
        matrix, cmap="coolwarm", vmin=-1.0, vmax=1.0, origin="lower", interpolation="nearest", aspect="auto"
    )
    panel.colorbar(image, ax=axes, label="cosine similarity of the directions")
    if suggestion is not None:
        axes.axhline(suggestion.measurement, **MEASUREMENT_LINE)
        axes.axvline(suggestion.measurement, **MEASUREMENT_LINE)
        # The cells that decided the edited range: cos(residual l + 1, measurement) per edited layer l.
        written = _written_residuals(suggestion)
        axes.add_patch(
            Rectangle(
                (written.start - 0.5, suggestion.measurement - 0.5),
                len(written),
                1.0,
                fill=False,
                edgecolor="gold",
                linewidth=2.5,
                label=f"residuals {format_layers(written)} (written by the edited decoder layers): "
                f"their cos with residual {suggestion.measurement}",
            )
        )
    axes.set_title("Direction cosine similarity, residual by residual", fontsize=12, fontweight="bold")
    axes.set_xlabel("residual L (blank: no direction at that residual)")
    axes.set_ylabel("residual L")
    _panel_legend(panel, axes.get_legend_handles_labels()[0])


def draw_analysis(
    figure: Figure, report: SignalReport, suggestion: PlanSuggestion | None, title: str
) -> None:
    layers = np.array([signal.index for signal in report.layers])
    panels = figure.subfigures(3, 2)
    _plot_norms(panels[0, 0], report, layers, suggestion)
    _plot_cosines(panels[0, 1], report, layers, suggestion)
    _plot_separation(panels[1, 0], report, layers, suggestion)
    _plot_score(panels[1, 1], report, layers, suggestion)
    _plot_rotation(panels[2, 0], report, layers, suggestion)
    _plot_heatmap(panels[2, 1], report, suggestion)
    _suggestion_key(figure, suggestion)
    figure.suptitle(title, fontsize=15, fontweight="bold")


def analysis_figure(report: SignalReport, suggestion: PlanSuggestion | None, title: str) -> Figure:
    """The chart on a headless (Agg) figure: no pyplot, no display."""
    figure = Figure(figsize=FIGURE_INCHES, dpi=DOTS_PER_INCH, layout="constrained")
    FigureCanvasAgg(figure)
    draw_analysis(figure, report, suggestion, title)
    return figure


def save_chart(report: SignalReport, suggestion: PlanSuggestion | None, title: str, path: Path) -> None:
    """Render headlessly and write the PNG atomically."""
    figure = analysis_figure(report, suggestion, title)
    with atomic_file(path) as temporary:
        figure.savefig(temporary, format="png", dpi=DOTS_PER_INCH)


def show_chart(report: SignalReport, suggestion: PlanSuggestion | None, title: str) -> None:
    """Open the chart in a window (only on request: this needs a display)."""
    from matplotlib import pyplot

    figure = pyplot.figure(figsize=FIGURE_INCHES, layout="constrained")
    draw_analysis(figure, report, suggestion, title)
    pyplot.show()
