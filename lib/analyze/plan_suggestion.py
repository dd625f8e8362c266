"""A starting ablation plan (SPEC §3) derived from the per-layer metrics, written as commented YAML.

The heuristic (docs/analyze.md explains the why):
1. Measurement layer: the best signal-quality score among residual indices
   1..floor(LATEST_MEASUREMENT_FRACTION * N); L = 0 (the embeddings) and the last layers are skipped.
2. Edited decoder layers: decoder layer l writes the residual l + 1, so start from the layer that
   writes the chosen residual (measurement - 1) and grow a contiguous run, both ways, while the
   direction measured at each layer's output keeps a cosine >= ALIGNMENT_THRESHOLD with the chosen one.
Every edited layer uses the chosen direction at full strength (scale 1.0, sparsity 1.0); the plan
writes each run of consecutive edited layers as one entry with a range (`layer: "2-7"`).
The result is unverified: no forward pass checks it (search.py and evaluate.py --plan do).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lib.ablate.plan import format_layers, merge_layer_ranges
from lib.analyze.signal_metrics import SignalReport
from lib.core.atomic import atomic_file, check_writable_destination
from lib.core.errors import UserError
from lib.core.model_files import text_config_of
from lib.measure.measurements import Measurements

# Arditi et al. (2024, "Refusal in language models is mediated by a single direction") discard
# candidate directions from the last 20% of the layers: there they mostly encode the output tokens.
LATEST_MEASUREMENT_FRACTION = 0.8
ALIGNMENT_THRESHOLD = 0.5
BEST_LAYER_COUNT = 3
DEFAULT_SCALE = 1.0
DEFAULT_SPARSITY = 1.0
ALIGNMENTS_PER_COMMENT_LINE = 8
# Said wherever a suggestion is shown: in the plan's header and in analyze.py's summary.
UNVERIFIED_NOTE = (
    "Unverified: a heuristic from the measurements alone, not checked with forward passes.",
    "  python search.py --model MODEL --measurements M.pt --plan PLAN.yml --output EDITED_DIR",
    "    finds a plan with forward passes and previews it;",
    "  python evaluate.py --model MODEL --plan PLAN.yml previews a plan's effect without writing a model.",
)


@dataclass(frozen=True)
class PlanSuggestion:
    measurement: int  # residual index whose direction every entry uses
    edited_layers: list[int]  # contiguous decoder layers, ascending
    alignment: dict[int, float | None]  # decoder layer -> cos(direction at its output, chosen direction)
    candidates: range  # measurement indices that were considered
    ranking: list[int]  # the best candidates by score, best first

    @property
    def outside_neighbours(self) -> list[int]:
        """The decoder layers just below and above the edited run, with their alignment known."""
        return [
            layer
            for layer in (self.edited_layers[0] - 1, self.edited_layers[-1] + 1)
            if layer in self.alignment
        ]


def best_layers(
    report: SignalReport, indices: range | None = None, count: int = BEST_LAYER_COUNT
) -> list[int]:
    """Layer indices with a positive score, best first (ties: the earlier layer)."""
    pool = [
        signal
        for signal in report.layers
        if signal.score > 0 and (indices is None or signal.index in indices)
    ]
    return [signal.index for signal in sorted(pool, key=lambda signal: (-signal.score, signal.index))[:count]]


def candidate_measurements(report: SignalReport, num_layers: int) -> range:
    last_measured = report.layers[-1].index
    return range(1, min(max(1, math.floor(LATEST_MEASUREMENT_FRACTION * num_layers)), last_measured) + 1)


def output_alignment(report: SignalReport, decoder_layer: int, measurement: int) -> float | None:
    """cos(direction of the residual that `decoder_layer` writes, direction at `measurement`)."""
    written = decoder_layer + 1
    if written >= len(report.layers):
        return None  # llm-abliteration files stop at N - 1
    return report.direction_cosine(written, measurement)


def suggest_plan(report: SignalReport, num_layers: int) -> PlanSuggestion | None:
    """The heuristic above; None when no candidate layer carries any signal."""
    candidates = candidate_measurements(report, num_layers)
    ranking = best_layers(report, candidates)
    if not ranking:
        return None
    measurement = ranking[0]
    alignment = {layer: output_alignment(report, layer, measurement) for layer in range(num_layers)}

    def aligned(layer: int) -> bool:
        value = alignment.get(layer)
        return value is not None and value >= ALIGNMENT_THRESHOLD

    first = last = measurement - 1
    while aligned(first - 1):
        first -= 1
    while aligned(last + 1):
        last += 1
    return PlanSuggestion(
        measurement=measurement,
        edited_layers=list(range(first, last + 1)),
        alignment=alignment,
        candidates=candidates,
        ranking=ranking,
    )


def check_model_matches(config: dict[str, Any], measurements: Measurements, model: str) -> None:
    """The plan's model must be the measured one: same decoder layer count and hidden size."""
    text_config = text_config_of(config)
    mismatches = measurements.model_mismatches(
        text_config.get("num_hidden_layers"), text_config.get("hidden_size")
    )
    if mismatches:
        key, (actual, measured) = next(iter(mismatches.items()))  # the layer count first
        raise UserError(
            f"--model {model}: config has {key}={actual} but {measurements.source} was measured with "
            f"{measured}; pass the model the measurements came from"
        )


def _number(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def _explain_measurement(suggestion: PlanSuggestion, report: SignalReport, num_layers: int) -> list[str]:
    chosen = report.layer(suggestion.measurement)
    separation_part = (
        f" x S/(1+S) with separation S {_number(chosen.separation)}"
        if report.has_variances
        else " (no variances in the file: separation n/a, not in the score)"
    )
    runners_up = ", ".join(
        f"layer {index} ({_number(report.layer(index).score)})" for index in suggestion.ranking[1:]
    )
    lines = [
        f"Measurement layer {chosen.index} (the residual stream entering decoder layer {chosen.index}):",
        f"  the best signal-quality score among measurement layers {suggestion.candidates.start}.."
        f"{suggestion.candidates.stop - 1} of 0..{num_layers}; later layers are skipped, their",
        "  directions mostly describe the output tokens.",
        f"  score {_number(chosen.score)} = relative magnitude {_number(chosen.relative_magnitude)}"
        f" x purity {_number(chosen.purity)}{separation_part}",
        f"  cos(harmful, harmless) {_number(chosen.cos_harmful_harmless)}, "
        f"|refusal| {_number(chosen.refusal_norm)}",
    ]
    if runners_up:
        lines.append(f"  runners-up: {runners_up}")
    return lines


def _explain_range(suggestion: PlanSuggestion) -> list[str]:
    lines = [
        f"Edited decoder layers {format_layers(suggestion.edited_layers)}: decoder layer l writes the "
        f"residual l+1. Starting from layer {suggestion.measurement - 1},",
        "  which writes the measured residual, the run grows both ways while the direction measured at",
        f"  each layer's output keeps cos >= {ALIGNMENT_THRESHOLD} with the chosen one.",
    ]
    outside = [
        f"layer {layer} (cos {_number(suggestion.alignment[layer], 3)})"
        for layer in suggestion.outside_neighbours
    ]
    if outside:
        lines.append(f"  Just outside the run: {', '.join(outside)}.")
    return lines


def plan_yaml(
    suggestion: PlanSuggestion,
    report: SignalReport,
    num_layers: int,
    *,
    model: str,
    measurements: Path,
    output: str,
) -> str:
    """The plan as YAML text with comments giving the numbers behind each choice."""
    comments = [
        f"Ablation plan suggested by analyze.py from {measurements.name}.",
        *UNVERIFIED_NOTE,
        "A starting point: edit it, check it with `python sharded_ablate.py PLAN.yml --dry-run`, run it.",
        "",
        *_explain_measurement(suggestion, report, num_layers),
        "",
        *_explain_range(suggestion),
        "scale: 1.0 removes the direction fully, 0 not at all, negative adds it; sparsity (0, 1] keeps the",
        "largest direction components only. The full table: python analyze.py MEASUREMENTS.pt",
    ]
    lines = [f"# {line}".rstrip() for line in comments]
    # JSON strings are valid YAML double-quoted scalars, so any path is quoted safely.
    lines += [
        f"model: {json.dumps(model)}",
        f"measurements: {json.dumps(str(measurements))}",
        f"output: {json.dumps(output)}",
        f"scale: {DEFAULT_SCALE}  # global multiplier of every entry's scale",
        "ablate:",
    ]
    for run in merge_layer_ranges(range(layer, layer + 1) for layer in suggestion.edited_layers):
        lines += [
            *_alignment_comments(run, suggestion.alignment),
            f"  - layer: {_layer_value(run)}",
            f"    measurement: {suggestion.measurement}",
            f"    scale: {DEFAULT_SCALE}",
            f"    sparsity: {DEFAULT_SPARSITY}",
        ]
    return "\n".join(lines) + "\n"


def _layer_value(run: range) -> str:
    """A plan entry's `layer`: a number for one layer, a quoted inclusive range "A-B" for more."""
    return str(run.start) if len(run) == 1 else json.dumps(format_layers(run))


def _alignment_comments(run: range, alignment: dict[int, float | None]) -> list[str]:
    """cos(direction at each layer's output, chosen direction), a few layers per comment line."""
    figures = [f"{layer}: {_number(alignment[layer], 3)}" for layer in run]
    rows = [
        ", ".join(figures[start : start + ALIGNMENTS_PER_COMMENT_LINE])
        for start in range(0, len(figures), ALIGNMENTS_PER_COMMENT_LINE)
    ]
    return [
        "  # l: cos(direction at the output of decoder layer l, chosen direction)",
        *(f"  #   {row}" for row in rows),
    ]


def check_plan_destination(path: Path) -> None:
    """A plan is meant to be hand-edited: never overwrite one."""
    check_writable_destination(path, "--suggest")
    if path.exists():
        raise UserError(
            f"--suggest {path}: already exists; a plan may hold hand edits, so choose a new path or delete it"
        )


def write_plan(text: str, path: Path) -> None:
    with atomic_file(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
