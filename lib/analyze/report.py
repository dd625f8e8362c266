"""The per-layer table printed by analyze.py, and the same data as JSON."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from lib.ablate.plan import format_layers
from lib.analyze.plan_suggestion import UNVERIFIED_NOTE, PlanSuggestion, best_layers
from lib.analyze.signal_metrics import LayerSignal, SignalReport
from lib.measure.measurements import Measurements


def _general(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _fixed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.4f}"


# (header, field of LayerSignal, formatter); the order is the table's column order.
COLUMNS: list[tuple[str, str, Callable[[float | None], str]]] = [
    ("|harmful|", "harmful_norm", _general),
    ("|harmless|", "harmless_norm", _general),
    ("|refusal|", "refusal_norm", _general),
    ("cos(h+,h-)", "cos_harmful_harmless", _fixed),
    ("cos(h+,d)", "cos_harmful_direction", _fixed),
    ("cos(h-,d)", "cos_harmless_direction", _fixed),
    ("rel.mag", "relative_magnitude", _general),
    ("separation", "separation", _general),
    ("purity", "purity", _general),
    ("score", "score", _general),
    ("cos(prev d)", "cos_previous", _fixed),
]


def _row(signal: LayerSignal, ranks: dict[int, int]) -> list[str]:
    rank = ranks.get(signal.index)
    return [
        str(signal.index),
        *(format_value(getattr(signal, name)) for _, name, format_value in COLUMNS),
        f"*{rank}" if rank else "",
    ]


def format_table(report: SignalReport) -> str:
    """One row per layer, right-aligned columns; the best layers by score are marked *1, *2, *3."""
    ranks = {index: rank for rank, index in enumerate(best_layers(report), start=1)}
    header = ["layer", *(title for title, _, _ in COLUMNS), "best"]
    rows = [_row(signal, ranks) for signal in report.layers]
    widths = [max(len(cells[column]) for cells in [header, *rows]) for column in range(len(header))]
    return "\n".join(
        "  ".join(cell.rjust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()
        for cells in [header, *rows]
    )


def format_summary(report: SignalReport, suggestion: PlanSuggestion | None) -> str:
    best = ", ".join(f"{index} ({report.layer(index).score:.4g})" for index in best_layers(report))
    lines = [f"best layers by score: {best or 'none (no layer carries a signal)'}"]
    if not report.has_variances:
        lines.append("separation: n/a (the file has no harmful_var_L/harmless_var_L); the score omits it")
    if suggestion is not None:
        lines += [
            f"suggested: direction measured at layer {suggestion.measurement}, edit decoder layers "
            f"{format_layers(suggestion.edited_layers)} (write it with --suggest PLAN.yml --model DIR "
            "--output DIR)",
            *UNVERIFIED_NOTE,
        ]
    return "\n".join(lines)


def _suggestion_data(suggestion: PlanSuggestion | None) -> dict[str, Any] | None:
    if suggestion is None:
        return None
    return {
        "measurement": suggestion.measurement,
        "edited_layers": suggestion.edited_layers,
        "alignment": {str(layer): value for layer, value in suggestion.alignment.items()},
        "candidates": [suggestion.candidates.start, suggestion.candidates.stop - 1],
        "ranking": suggestion.ranking,
    }


def report_data(
    measurements: Measurements, report: SignalReport, suggestion: PlanSuggestion | None
) -> dict[str, Any]:
    """Everything the table, the summary and the chart show, as plain JSON-ready values (None = n/a)."""
    ranks = {index: rank for rank, index in enumerate(best_layers(report), start=1)}
    indices = range(len(report.direction_cosines))
    return {
        "measurements": str(measurements.source),
        "num_layers": measurements.num_layers,
        "hidden_size": measurements.hidden_size,
        "has_variances": report.has_variances,
        "best_layers": list(ranks),
        "layers": [
            {**dataclasses.asdict(signal), "rank": ranks.get(signal.index)} for signal in report.layers
        ],
        "direction_cosines": [
            [report.direction_cosine(row, column) for column in indices] for row in indices
        ],
        "suggestion": _suggestion_data(suggestion),
    }
