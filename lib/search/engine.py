"""search.py's engine: plans proposed by Optuna and scored with forward passes on the model in memory.

A trial is one plan entry (a measurement layer, a run of edited layers, a scale, the projection
variant, norm preservation, the components). It is resolved exactly as sharded_ablate.py resolves a
plan file, applied to the loaded model by lib/ablate/in_memory_edit.py, scored, and undone: no model load
and no disk write per trial. The score is what evaluate.py reports, on short replies to held-back
prompts: the refusal rate on harmful prompts, the refusal rate on harmless ones, and the mean
first-token KL divergence from the unedited model on the harmless ones.

Optuna minimises two objectives, harmful refusal and KL; the chosen trial is the lowest KL among
those that meet the refusal target (else the lowest refusal). The first trials are analyze.py's
suggestion and two variants of it, so the search starts from the free heuristic.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lib.ablate.architectures import (
    ATTENTION_OUTPUT,
    BIASES,
    DEFAULT_COMPONENTS,
    MLP_OUTPUT,
    ROUTER,
    SHARED_EXPERT_OUTPUT,
)
from lib.ablate.checkpoint import Checkpoint
from lib.ablate.in_memory_edit import InMemoryEditor, edited_in_memory
from lib.ablate.plan import PROJECTED_AT_BOTH, PROJECTION_CHOICES, Options, Plan, PlanEntry
from lib.ablate.resolution import Resolution, resolve
from lib.analyze.plan_suggestion import PlanSuggestion
from lib.core.errors import UserError
from lib.core.generation import DecodingSettings, generate_replies
from lib.evaluate.divergence import kl_divergence
from lib.evaluate.refusal_markers import RefusalDetector
from lib.measure.measurements import Measurements

ALL_COMPONENTS = "all"
# The component groups a trial may edit, by name: the whole layer, only attention's output, or only
# the MLP's (with its experts' router and shared expert). Groups the family lacks are not offered.
COMPONENT_GROUPS: dict[str, frozenset[str]] = {
    ALL_COMPONENTS: frozenset({ATTENTION_OUTPUT, MLP_OUTPUT, SHARED_EXPERT_OUTPUT, ROUTER, BIASES}),
    ATTENTION_OUTPUT: frozenset({ATTENTION_OUTPUT, BIASES}),
    MLP_OUTPUT: frozenset({MLP_OUTPUT, SHARED_EXPERT_OUTPUT, ROUTER, BIASES}),
}
SCALE_RANGE = (0.5, 2.5)
HARMFUL_REFUSAL, KL = 0, 1  # positions of the objectives in a trial's values


def family_components(checkpoint: Checkpoint) -> frozenset[str]:
    """The components the checkpoint's family has tensors for."""
    return frozenset(rule.component for rule in checkpoint.family.rules)


def selected_components(group: str, available: frozenset[str]) -> frozenset[str]:
    """A group as a plan's `components`: the plan default for all, else the members the family has
    (naming a component the family lacks is an error in a plan: it would silently edit nothing)."""
    if group == ALL_COMPONENTS:
        return DEFAULT_COMPONENTS
    return COMPONENT_GROUPS[group] & (available | {BIASES})


@dataclass(frozen=True)
class TrialPlan:
    """One point of the search space: a single plan entry."""

    measurement: int
    first_layer: int
    last_layer: int
    scale: float
    projected: str
    norm_preserve: bool
    components: str  # a key of COMPONENT_GROUPS

    def entry(self, available: frozenset[str]) -> PlanEntry:
        """The plan entry on a family whose tensors belong to the `available` components."""
        options = Options(
            scale=self.scale,
            components=selected_components(self.components, available),
            projected=self.projected,
            norm_preserve=self.norm_preserve,
        )
        return PlanEntry(
            "ablate[0]", (range(self.first_layer, self.last_layer + 1),), self.measurement, options
        )

    def plan(
        self, source: Path, model: str, measurements: Path, output: Path, available: frozenset[str]
    ) -> Plan:
        return Plan(source, model, measurements, output, 1.0, (self.entry(available),), None)

    @classmethod
    def from_parameters(cls, parameters: dict) -> TrialPlan:
        return cls(**{key: parameters[key] for key in cls.__dataclass_fields__})

    def parameters(self) -> dict:
        return asdict(self)


def suggestion_trials(suggestion: PlanSuggestion) -> list[TrialPlan]:
    """analyze.py's suggestion as written, then biprojected, then biprojected and norm-preserving."""
    written = TrialPlan(
        suggestion.measurement,
        suggestion.edited_layers[0],
        suggestion.edited_layers[-1],
        1.0,
        PROJECTION_CHOICES[0],
        False,
        ALL_COMPONENTS,
    )
    projected = TrialPlan(**{**written.parameters(), "projected": PROJECTED_AT_BOTH})
    return [written, projected, TrialPlan(**{**projected.parameters(), "norm_preserve": True})]


@dataclass(frozen=True)
class SearchSpace:
    num_layers: int
    measurements: range  # the measurement layers a trial may use
    component_groups: tuple[str, ...]

    @classmethod
    def for_checkpoint(cls, checkpoint: Checkpoint, measurements: range) -> SearchSpace:
        available = family_components(checkpoint)
        groups = tuple(
            name
            for name, group in COMPONENT_GROUPS.items()
            if name == ALL_COMPONENTS or (group & available) - {BIASES, ROUTER}
        )
        return cls(checkpoint.num_layers, measurements, groups)

    def suggest(self, trial: optuna.Trial) -> TrialPlan:
        """Optuna's proposal for this trial (define-by-run: the last layer is drawn at or after the first)."""
        first_layer = trial.suggest_int("first_layer", 0, self.num_layers - 1)
        return TrialPlan(
            measurement=trial.suggest_int("measurement", self.measurements.start, self.measurements.stop - 1),
            first_layer=first_layer,
            last_layer=trial.suggest_int("last_layer", first_layer, self.num_layers - 1),
            scale=trial.suggest_float("scale", *SCALE_RANGE),
            projected=trial.suggest_categorical("projected", PROJECTION_CHOICES),
            norm_preserve=trial.suggest_categorical("norm_preserve", (False, True)),
            components=trial.suggest_categorical("components", self.component_groups),
        )


@dataclass(frozen=True)
class Score:
    harmful_refused: int
    harmful_prompts: int
    harmless_refused: int
    harmless_prompts: int
    kl_mean: float  # first reply token, harmless prompts, nats; 0 for the unedited model
    kl_median: float
    kl_max: float
    seconds: float

    @property
    def harmful_refusal(self) -> float:
        return self.harmful_refused / self.harmful_prompts

    @property
    def harmless_refusal(self) -> float:
        return self.harmless_refused / self.harmless_prompts

    def attributes(self) -> dict:
        return asdict(self)

    @classmethod
    def from_attributes(cls, attributes: dict) -> Score:
        return cls(**{key: attributes[key] for key in cls.__dataclass_fields__})


@dataclass(frozen=True)
class ScoringPrompts:
    harmful: list[list[int]]  # chat-formatted token ids
    harmless: list[list[int]]


class TrialScorer:
    """Scores resolutions on one loaded model; the unedited model's figures are measured first."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        checkpoint: Checkpoint,
        prompts: ScoringPrompts,
        detector: RefusalDetector,
        reply_tokens: int,
        batch_size: int,
    ) -> None:
        self.model, self.tokenizer, self.prompts, self.detector = model, tokenizer, prompts, detector
        self.decoding = DecodingSettings(max_new_tokens=reply_tokens)
        self.batch_size = batch_size
        self.editor = InMemoryEditor(model, checkpoint)
        self.reference: torch.Tensor | None = None
        self.original = self._score()

    def score(self, resolution: Resolution) -> Score:
        with edited_in_memory(self.editor, resolution):
            return self._score()

    def _score(self) -> Score:
        started = time.perf_counter()
        harmful = self._replies(self.prompts.harmful, keep_first_token=False)
        harmless = self._replies(self.prompts.harmless, keep_first_token=True)
        log_probabilities = harmless.first_token_log_probabilities
        if self.reference is None:
            self.reference = log_probabilities
        divergence = kl_divergence(self.reference, log_probabilities)
        return Score(
            harmful_refused=sum(map(self.detector.is_refusal, harmful.replies)),
            harmful_prompts=len(harmful.replies),
            harmless_refused=sum(map(self.detector.is_refusal, harmless.replies)),
            harmless_prompts=len(harmless.replies),
            kl_mean=float(divergence.mean()),
            kl_median=float(divergence.median()),
            kl_max=float(divergence.max()),
            seconds=time.perf_counter() - started,
        )

    def _replies(self, token_ids: list[list[int]], keep_first_token: bool):
        return generate_replies(
            self.model,
            self.tokenizer,
            token_ids,
            self.decoding,
            self.batch_size,
            keep_first_token_log_probabilities=keep_first_token,
            show_progress=False,
        )


@dataclass(frozen=True)
class PlanContext:
    """What turns a trial into a plan: the model, the measurements and the plan's own paths."""

    checkpoint: Checkpoint
    measurements: Measurements
    model: str
    measurements_path: Path
    plan_path: Path
    output: Path

    def plan(self, trial_plan: TrialPlan) -> Plan:
        return trial_plan.plan(
            self.plan_path,
            self.model,
            self.measurements_path,
            self.output,
            family_components(self.checkpoint),
        )

    def resolution(self, trial_plan: TrialPlan) -> Resolution:
        return resolve(self.plan(trial_plan), self.checkpoint, self.measurements)


def make_sampler(seed: int, refusal_target: float) -> optuna.samplers.BaseSampler:
    """Multivariate TPE: it models how the parameters act together (the scale that works depends on the
    layers edited); `group` because the last layer's range depends on the first layer. The refusal
    target is a constraint, so that the sampler spends its trials where the chosen plan will come
    from, not on the many edits that keep the refusals and so cost no KL."""

    def refusal_above_target(trial: FrozenTrial) -> list[float]:
        refused, prompts = trial.user_attrs.get("harmful_refused"), trial.user_attrs.get("harmful_prompts")
        return [1.0] if refused is None else [refused / prompts - refusal_target]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed,
            n_startup_trials=10,
            multivariate=True,
            group=True,
            constraints_func=refusal_above_target,
        )


def run_trials(
    study: optuna.Study,
    space: SearchSpace,
    context: PlanContext,
    scorer: TrialScorer,
    trials: int,
    deadline: float | None,
    on_trial: Callable[[FrozenTrial], None],
) -> None:
    """Ask, score and tell until the study holds `trials` finished trials or the deadline has passed."""
    while finished_count(study) < trials and (deadline is None or time.monotonic() < deadline):
        trial = study.ask()
        trial_plan = space.suggest(trial)
        try:
            score = scorer.score(context.resolution(trial_plan))
        except UserError as error:  # e.g. a direction that vanishes once projected: not a plan at all
            trial.set_user_attr("error", str(error))
            study.tell(trial, state=TrialState.FAIL)
            on_trial(study.trials[trial.number])
            continue
        for key, value in score.attributes().items():
            trial.set_user_attr(key, value)
        if not math.isfinite(score.kl_mean):
            trial.set_user_attr("error", "the KL divergence is not finite")
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, [score.harmful_refusal, score.kl_mean])
        on_trial(study.trials[trial.number])


def finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)))


def fail_interrupted_trials(study: optuna.Study) -> int:
    """Trials left running by a killed search can never finish: mark them failed so that they are not counted."""
    interrupted = study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
    for trial in interrupted:
        if trial.state == TrialState.RUNNING:
            study.tell(trial.number, state=TrialState.FAIL)
    return sum(trial.state == TrialState.RUNNING for trial in interrupted)


def completed(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def choose(trials: Sequence[FrozenTrial], refusal_target: float) -> FrozenTrial | None:
    """The lowest KL among trials that meet the refusal target; else the lowest refusal (then KL)."""
    if not trials:
        return None
    meeting = [trial for trial in trials if trial.values[HARMFUL_REFUSAL] <= refusal_target]
    if meeting:
        return min(meeting, key=lambda trial: (trial.values[KL], trial.values[HARMFUL_REFUSAL], trial.number))
    return min(trials, key=lambda trial: (trial.values[HARMFUL_REFUSAL], trial.values[KL], trial.number))


def pareto_front(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """Completed trials no other trial beats on both objectives, by ascending refusal (the refusal
    target plays no part: the front shows the whole trade-off)."""
    front = [trial for trial in trials if not any(_dominates(other, trial) for other in trials)]
    return sorted(front, key=lambda trial: (trial.values[HARMFUL_REFUSAL], trial.values[KL], trial.number))


def _dominates(first: FrozenTrial, second: FrozenTrial) -> bool:
    return all(a <= b for a, b in zip(first.values, second.values)) and any(
        a < b for a, b in zip(first.values, second.values)
    )


def trial_plan_of(trial: FrozenTrial) -> TrialPlan:
    return TrialPlan.from_parameters(trial.params)


def score_of(trial: FrozenTrial) -> Score:
    return Score.from_attributes(trial.user_attrs)
