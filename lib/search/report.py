"""search.py's outputs: the chosen plan as commented YAML, every trial as JSON, and the refusal-vs-KL chart."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optuna.trial import FrozenTrial

from lib import __version__
from lib.ablate.plan import format_layers
from lib.core.atomic import atomic_file
from lib.search.engine import (
    ALL_COMPONENTS,
    HARMFUL_REFUSAL,
    KL,
    Score,
    TrialPlan,
    score_of,
    selected_components,
    trial_plan_of,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

KL_FLOOR = 1e-7  # where a KL of 0 (the unedited model) is drawn on the log axis


@dataclass(frozen=True)
class SearchOutcome:
    """Everything the outputs describe."""

    model: str
    measurements: Path
    output: Path
    original: Score  # the unedited model on the scoring prompts
    trials: list[FrozenTrial]  # every finished trial, failed ones included
    front: list[FrozenTrial]
    chosen: FrozenTrial
    refusal_target: float
    settings: dict[str, Any]
    available_components: frozenset[str]  # of the model's family: what a component group selects


def plan_text(outcome: SearchOutcome) -> str:
    """The chosen trial as a plan file: its figures, the Pareto front and the settings as comments."""
    chosen, score = outcome.chosen, score_of(outcome.chosen)
    meets = chosen.values[HARMFUL_REFUSAL] <= outcome.refusal_target
    comments = [
        f"Ablation plan found by search.py (version {__version__}) with forward passes: trial {chosen.number} of "
        f"{len(outcome.trials)}.",
        f"Scored on {score.harmful_prompts} harmful and {score.harmless_prompts} harmless prompts held back from "
        f"the measurement, greedy replies of {outcome.settings['reply_tokens']} tokens:",
        f"  refused harmful  {_rate(score.harmful_refused, score.harmful_prompts)}  "
        f"(unedited: {_rate(outcome.original.harmful_refused, outcome.original.harmful_prompts)})",
        f"  refused harmless {_rate(score.harmless_refused, score.harmless_prompts)}  "
        f"(unedited: {_rate(outcome.original.harmless_refused, outcome.original.harmless_prompts)})",
        f"  first-token KL from the unedited model, harmless: mean {score.kl_mean:.4g}, median "
        f"{score.kl_median:.4g}, max {score.kl_max:.4g} nats",
        (
            f"Chosen as the lowest KL among trials refusing <= {outcome.refusal_target:.1%} of the harmful prompts."
            if meets
            else f"No trial refused <= {outcome.refusal_target:.1%} of the harmful prompts: chosen for the lowest refusal."
        ),
        "Check it on held-out prompts before writing: python evaluate.py --model MODEL --plan THIS_FILE",
        "",
        "Pareto front (no other trial refuses less with a lower KL):",
        *front_table(outcome.front, chosen.number),
    ]
    trial_plan = trial_plan_of(chosen)
    lines = [f"# {line}".rstrip() for line in comments]
    lines += [
        f"model: {json.dumps(outcome.model)}",
        f"measurements: {json.dumps(str(outcome.measurements))}",
        f"output: {json.dumps(str(outcome.output))}",
        "ablate:",
        *entry_lines(trial_plan, outcome.available_components),
    ]
    return "\n".join(lines) + "\n"


def entry_lines(trial_plan: TrialPlan, available: frozenset[str]) -> list[str]:
    """The trial's single plan entry; a comment says what each key does."""
    layers = format_layers(range(trial_plan.first_layer, trial_plan.last_layer + 1))
    lines = [
        f"  - layer: {json.dumps(layers) if '-' in layers else layers}  # decoder layers whose weights are edited",
        f"    measurement: {trial_plan.measurement}  # the measured direction (residual entering that layer)",
        f"    scale: {trial_plan.scale:.4g}  # 1 removes the direction fully; above 1 removes more",
        f"    projected: {trial_plan.projected}  # orthogonalised against the harmless mean: none, measurement, "
        "edited, both",
        f"    norm_preserve: {'true' if trial_plan.norm_preserve else 'false'}",
    ]
    if trial_plan.components != ALL_COMPONENTS:
        listed = ", ".join(sorted(selected_components(trial_plan.components, available)))
        lines.append(f"    components: [{listed}]")
    return lines


def front_table(front: Sequence[FrozenTrial], chosen: int) -> list[str]:
    header = "   trial  harmful  harmless  KL mean    measurement  layers  scale  projected    norm_preserve  components"
    rows = [header]
    for trial in front:
        plan, score = trial_plan_of(trial), score_of(trial)
        rows.append(
            f"{'*' if trial.number == chosen else ' '} {trial.number:>5}  {score.harmful_refusal:>7.1%}  "
            f"{score.harmless_refusal:>8.1%}  {score.kl_mean:<9.3g}  {plan.measurement:>11}  "
            f"{format_layers(range(plan.first_layer, plan.last_layer + 1)):>6}  {plan.scale:>5.2f}  "
            f"{plan.projected:<11}  {str(plan.norm_preserve).lower():<13}  {plan.components}"
        )
    return rows


def _rate(count: int, total: int) -> str:
    return f"{count / total:.1%} ({count}/{total})"


def report_document(outcome: SearchOutcome) -> dict[str, Any]:
    """Every trial with its plan entry and figures (search.py --json)."""
    front = {trial.number for trial in outcome.front}
    return {
        "tool": "search.py",
        "tool_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": outcome.model,
        "measurements": str(outcome.measurements),
        "settings": outcome.settings,
        "refusal_target": outcome.refusal_target,
        "objectives": ["harmful refusal rate", "mean first-token KL on harmless prompts (nats)"],
        "unedited": outcome.original.attributes(),
        "chosen": outcome.chosen.number,
        "pareto_front": sorted(front),
        "trials": [_trial_document(trial, front) for trial in outcome.trials],
    }


def _trial_document(trial: FrozenTrial, front: set[int]) -> dict[str, Any]:
    document: dict[str, Any] = {"number": trial.number, "state": trial.state.name, "plan": trial.params}
    if trial.values is not None:
        document.update(score_of(trial).attributes(), pareto=trial.number in front)
    if "error" in trial.user_attrs:
        document["error"] = trial.user_attrs["error"]
    return document


def write_text(text: str, path: Path) -> None:
    with atomic_file(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def search_figure(outcome: SearchOutcome) -> Figure:
    """Harmful refusal rate against KL (log scale) for every trial, the front joined, the choice marked."""
    # matplotlib is only imported when a chart is wanted (search.py --chart): it costs every other run.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    completed = [trial for trial in outcome.trials if trial.values is not None]
    axes.scatter(
        [_kl(trial) for trial in completed],
        [trial.values[HARMFUL_REFUSAL] for trial in completed],
        s=18,
        color="#7f7f7f",
        alpha=0.7,
        label="trial",
    )
    axes.plot(
        [_kl(trial) for trial in outcome.front],
        [trial.values[HARMFUL_REFUSAL] for trial in outcome.front],
        "-o",
        color="#1f77b4",
        markersize=5,
        label="Pareto front",
    )
    first = next((trial for trial in completed if trial.number == 0), None)
    if first is not None:
        axes.scatter(
            [_kl(first)],
            [first.values[HARMFUL_REFUSAL]],
            marker="D",
            s=70,
            facecolor="none",
            edgecolor="#2ca02c",
            linewidths=2,
            label="trial 0: analyze.py's suggestion",
        )
    axes.scatter(
        [_kl(outcome.chosen)],
        [outcome.chosen.values[HARMFUL_REFUSAL]],
        marker="*",
        s=260,
        color="#d62728",
        label=f"chosen: trial {outcome.chosen.number}",
    )
    axes.axhline(
        outcome.refusal_target,
        color="#d62728",
        linestyle=":",
        linewidth=1,
        label=f"refusal target {outcome.refusal_target:.0%}",
    )
    axes.set_xscale("log")
    axes.set_xlabel(
        f"mean first-token KL from the unedited model on harmless prompts (nats; 0 drawn at {KL_FLOOR:g})"
    )
    axes.set_ylabel("refusal rate on harmful prompts")
    axes.yaxis.set_major_formatter(lambda value, _: f"{value:.0%}")
    axes.set_title(f"search.py: {len(completed)} trials on {Path(outcome.model).name}")
    axes.grid(True, which="major", alpha=0.3)
    figure.legend(loc="outside lower center", ncols=3, frameon=False)
    return figure


def _kl(trial: FrozenTrial) -> float:
    return max(trial.values[KL], KL_FLOOR)


def save_search_chart(outcome: SearchOutcome, path: Path) -> None:
    figure = search_figure(outcome)
    with atomic_file(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
