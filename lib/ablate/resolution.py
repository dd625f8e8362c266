"""Resolve a validated plan against a checkpoint and a measurement file into an explicit edit list.

Each edit names one tensor, the rule that edits it (writer or reader, which axis is residual), the
layer, where its direction comes from, the effective scale and the exact unit vector that will be
projected out (already passed through a norm gain where one applies). Everything that can be wrong
with the plan for this model is found here, before anything is written, and reported at once.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from lib.ablate.architectures import (
    ATTENTION_OUTPUT,
    BIASES,
    DEFAULT_COMPONENTS,
    MLP_OUTPUT,
    RESIDUAL_FIRST,
    RESIDUAL_LAST,
    ROUTER,
    SHARED_EXPERT_OUTPUT,
    Gain,
    Role,
    TensorRule,
)
from lib.ablate.checkpoint import Checkpoint, TensorMatch
from lib.ablate.plan import MeasurementSpec, Plan, PlanEntry, layers_are, raise_problems
from lib.ablate.projection import (
    DegenerateDirectionError,
    interpolated,
    mean_direction,
    orthogonalized,
    sparsified,
    through_gain,
    unit,
)
from lib.ablate.safetensors_stream import FLOATING_DTYPES
from lib.measure.measurements import Measurements


@dataclass(frozen=True)
class TensorEdit:
    tensor: str
    component: str
    role: Role
    residual_axis: int
    layer: int | None  # None for the embedding
    source: str  # the plan entry, e.g. "ablate[2]"
    direction_label: str  # where the direction comes from, in words
    gain_label: str | None  # the norm gain the direction was passed through, if any
    scale: float
    norm_preserve: bool
    direction: torch.Tensor = field(repr=False)  # float64 unit vector, exactly what is projected out

    @property
    def rule(self) -> str:
        layout = "[hidden, in]" if self.residual_axis == RESIDUAL_FIRST else "[..., hidden]"
        return f"{self.role.value} {layout}" + (" norm-preserving" if self.norm_preserve else "")


@dataclass(frozen=True)
class Resolution:
    edits: tuple[TensorEdit, ...]
    untie_embeddings: bool  # the embedding is edited while tied to the output head


def resolve(plan: Plan, checkpoint: Checkpoint, measurements: Measurements) -> Resolution:
    problems: list[str] = []
    _check_measurements_fit(checkpoint, measurements, problems)
    raise_problems(plan.source, problems)  # nothing below makes sense for another model's measurements
    matches = checkpoint.layer_matches
    edits: list[TensorEdit] = []
    for entry in plan.entries:
        _check_components_exist(entry, checkpoint, problems)
        for layer in _layers_in_range(entry, checkpoint, problems):
            edits.extend(_layer_edits(plan, entry, layer, checkpoint, measurements, matches, problems))
    untie = False
    if plan.embeddings is not None:
        embedding_edit = _embedding_edit(plan, plan.embeddings, checkpoint, measurements, problems)
        if embedding_edit is not None:
            edits.append(embedding_edit)
            untie = checkpoint.ties_embeddings()
    raise_problems(plan.source, problems)
    return Resolution(tuple(edits), untie)


def _check_components_exist(entry: PlanEntry, checkpoint: Checkpoint, problems: list[str]) -> None:
    """A component chosen by name that the family has no tensors for would silently edit nothing.

    The default selection names every component and means "whatever this family has", so only an
    explicit list is checked; `biases` is a switch on the writers, not a tensor kind of its own.
    """
    if entry.options.components == DEFAULT_COMPONENTS:
        return
    available = {rule.component for rule in checkpoint.family.rules}
    for component in sorted(entry.options.components - available - {BIASES}):
        problems.append(
            f"{entry.path}.components: model_type {checkpoint.model_type} has no {component} tensors; "
            f"it has: {', '.join(sorted(available))}"
        )


def _layers_in_range(entry: PlanEntry, checkpoint: Checkpoint, problems: list[str]) -> list[int]:
    """The entry's layers the model has; the others are one problem, however many there are.

    Ranges are cut at the model's layer count before any is expanded: a typo like "2-30000000"
    costs nothing.
    """
    count = checkpoint.num_layers
    outside = [
        range(max(layers.start, count), layers.stop) for layers in entry.layer_ranges if layers.stop > count
    ]
    if outside:
        problems.append(
            f"{entry.path}.layer: {layers_are(outside)} out of range; the model has layers 0..{count - 1}"
        )
    return [layer for layers in entry.layer_ranges for layer in range(layers.start, min(layers.stop, count))]


def _check_measurements_fit(checkpoint: Checkpoint, measurements: Measurements, problems: list[str]) -> None:
    source = measurements.source
    mismatches = measurements.model_mismatches(checkpoint.num_layers, checkpoint.hidden_size)
    if "hidden_size" in mismatches:
        problems.append(
            f"measurements {source}: directions have {measurements.hidden_size} components, "
            f"but the model's hidden size is {checkpoint.hidden_size} (measured on another model?)"
        )
    if "num_hidden_layers" in mismatches:
        problems.append(
            f"measurements {source}: measured a model with {measurements.num_layers} layers, "
            f"but the model has {checkpoint.num_layers}"
        )


def _direction(
    entry: PlanEntry,
    spec: MeasurementSpec,
    harmless_layer: int,
    measurements: Measurements,
    problems: list[str],
) -> tuple[torch.Tensor, str] | None:
    """The entry's prepared unit direction (measured, projected, sparsified) and how it was made."""
    label = _measurement_label(spec)
    options = entry.options
    try:
        direction = _measured_direction(spec, measurements, options.projected_at_measurement)
        if options.projected_at_measurement:
            label += ", projected against harmless at the measurement"
        if options.projected_at_edited_layer:
            direction = orthogonalized(direction, _harmless_mean(harmless_layer, measurements))
            label += f", projected against harmless {harmless_layer}"
        if options.sparsity < 1.0:
            direction = sparsified(direction, options.sparsity)
            label += f", sparsity {options.sparsity:g}"
    except _MissingHarmlessMean as missing:
        problems.append(
            f"{entry.path}.projected: needs the harmless mean of layer {missing.layer}, "
            "which the measurement file lacks"
        )
        return None
    except _MissingMeasurement as missing:
        available = sorted(measurements.layers)
        problems.append(
            f"{entry.path}.measurement: the measurement file has no layer {missing.layer} "
            f"(it has {available[0]}..{available[-1]})"
        )
        return None
    except DegenerateDirectionError as error:
        problems.append(f"{entry.path}: {error} after preparing it from {label}; choose another measurement")
        return None
    return direction, label


def _harmless_mean(layer: int, measurements: Measurements) -> torch.Tensor:
    measured = measurements.layers.get(layer)
    if measured is None or measured.harmless_mean is None:
        raise _MissingHarmlessMean(layer)
    return measured.harmless_mean


class _MissingHarmlessMean(Exception):
    def __init__(self, layer: int) -> None:
        super().__init__(layer)
        self.layer = layer


class _MissingMeasurement(Exception):
    def __init__(self, layer: int) -> None:
        super().__init__(layer)
        self.layer = layer


def _measurement_label(spec: MeasurementSpec) -> str:
    if isinstance(spec, tuple):
        return "mean of " + " and ".join(_measurement_label(item) for item in spec)
    return f"measurement {spec:g}"


def _measured_direction(spec: MeasurementSpec, measurements: Measurements, projected: bool) -> torch.Tensor:
    """The unit direction `spec` names; with `projected`, each measured layer's direction is first
    orthogonalised against that layer's harmless mean (as `measure.py --projected` stores it)."""

    def measured(layer: int) -> torch.Tensor:
        if layer not in measurements.layers:
            raise _MissingMeasurement(layer)
        direction = measurements.layers[layer].direction
        return orthogonalized(direction, _harmless_mean(layer, measurements)) if projected else direction

    if isinstance(spec, tuple):
        return mean_direction([_measured_direction(item, measurements, projected) for item in spec])
    if isinstance(spec, float):
        lower = math.floor(spec)
        return interpolated(measured(lower), measured(lower + 1), spec - lower)
    return unit(measured(spec))


def _layer_edits(
    plan: Plan,
    entry: PlanEntry,
    layer: int,
    checkpoint: Checkpoint,
    measurements: Measurements,
    matches: dict[int, list[TensorMatch]],
    problems: list[str],
) -> list[TensorEdit]:
    prepared = _direction(
        entry, layer if entry.measurement is None else entry.measurement, layer, measurements, problems
    )
    selected = [
        match
        for match in matches.get(layer, [])
        if match.rule.component in entry.options.components
        and (not match.rule.is_bias or BIASES in entry.options.components)
    ]
    _check_layer_complete(entry, layer, checkpoint, matches.get(layer, []), problems)
    if prepared is None:
        return []
    direction, label = prepared
    edits = []
    for match in selected:
        if not _is_editable(entry, match.name, checkpoint, problems):
            continue
        gain_label, effective = None, direction
        if match.rule.gain is not None:
            gained = _through_gain(entry, layer, match.rule.gain, direction, checkpoint, problems)
            if gained is None:
                continue
            effective, gain_label = gained
        writer = match.rule.role is Role.WRITER
        edits.append(
            TensorEdit(
                match.name,
                match.rule.component,
                match.rule.role,
                match.rule.residual_axis,
                layer,
                entry.path,
                label,
                gain_label,
                plan.effective_scale(entry),
                entry.options.norm_preserve and writer,
                effective,
            )
        )
    return edits


def _is_editable(entry: PlanEntry, name: str, checkpoint: Checkpoint, problems: list[str]) -> bool:
    dtype = checkpoint.tensors[name].dtype
    if dtype not in FLOATING_DTYPES:
        problems.append(
            f"{entry.path}: {name} is stored as {dtype}; only floating-point tensors "
            f"({', '.join(sorted(FLOATING_DTYPES))}) can be edited (dequantise the checkpoint first)"
        )
        return False
    return True


def _through_gain(
    entry: PlanEntry,
    layer: int,
    gain: Gain,
    direction: torch.Tensor,
    checkpoint: Checkpoint,
    problems: list[str],
) -> tuple[torch.Tensor, str] | None:
    norm_name = f"{checkpoint.layout.model_prefix}layers.{layer}.{gain.norm}"
    if norm_name not in checkpoint.tensors:
        problems.append(f"{entry.path}: layer {layer} has no norm {norm_name}, whose gain this family needs")
        return None
    weights = checkpoint.read(norm_name).to(torch.float64)
    convention = f"{gain.offset:g} + weight" if gain.offset else "weight"
    try:
        return through_gain(direction, gain.offset + weights), f"{norm_name} ({convention})"
    except DegenerateDirectionError as error:
        problems.append(f"{entry.path}: layer {layer}: {error} once passed through the gain of {norm_name}")
        return None


def _check_layer_complete(
    entry: PlanEntry,
    layer: int,
    checkpoint: Checkpoint,
    layer_matches: list[TensorMatch],
    problems: list[str],
) -> None:
    """A planned layer must have every tensor its family promises; otherwise the names are not understood."""
    family = checkpoint.family
    weights = [match for match in layer_matches if not match.rule.is_bias]
    found = {match.rule.component for match in weights}
    experts = [match for match in weights if match.rule.is_expert]
    required = [
        component for component in (ATTENTION_OUTPUT, MLP_OUTPUT) if component in entry.options.components
    ]
    if experts:
        required += [
            component
            for component, needed in (
                (ROUTER, True),
                (SHARED_EXPERT_OUTPUT, family.shared_expert_in_moe_layers),
            )
            if needed and component in entry.options.components
        ]
        expected_experts = checkpoint.text_config.get(family.expert_count_key or "")
        counted = _expert_count(experts, checkpoint)
        if isinstance(expected_experts, int) and counted != expected_experts:
            problems.append(
                f"{entry.path}: layer {layer} has {counted} experts' output tensors, "
                f"config.json says {family.expert_count_key} = {expected_experts}"
            )
    prefix = f"{checkpoint.layout.model_prefix}layers.{layer}."
    for component in required:
        if component not in found:
            examples = ", ".join(
                sorted(
                    {
                        readable_suffix(rule)
                        for rule in family.rules
                        if rule.component == component and not rule.is_bias
                    }
                )
            )
            problems.append(
                f"{entry.path}: layer {layer} has no {component} tensor; expected names under "
                f"{prefix} like {examples} (model_type {checkpoint.model_type})"
            )


def readable_suffix(rule: TensorRule) -> str:
    """A rule's name pattern as a user reads it: `mlp.experts.E.down_proj.weight`."""
    return re.sub(r"\(\?P<expert>[^)]*\)", "E", rule.suffix).replace("\\", "")


def _expert_count(experts: list[TensorMatch], checkpoint: Checkpoint) -> int:
    numbered = {match.expert for match in experts if match.expert is not None}
    if numbered:
        return len(numbered)
    return checkpoint.tensors[experts[0].name].shape[0]  # fused [experts, ...]


def _embedding_edit(
    plan: Plan, entry: PlanEntry, checkpoint: Checkpoint, measurements: Measurements, problems: list[str]
) -> TensorEdit | None:
    name = checkpoint.embedding_name
    if name not in checkpoint.tensors:
        problems.append(f"embeddings: the checkpoint has no {name}")
        return None
    if not _is_editable(entry, name, checkpoint, problems):
        return None
    # The embedding's output is the residual stream entering layer 0: its harmless mean is layer 0's.
    prepared = _direction(entry, entry.measurement, 0, measurements, problems)
    if prepared is None:
        return None
    direction, label = prepared
    return TensorEdit(
        name,
        "embeddings",
        Role.WRITER,
        RESIDUAL_LAST,
        None,
        entry.path,
        label,
        None,
        plan.effective_scale(entry),
        entry.options.norm_preserve,
        direction,
    )
