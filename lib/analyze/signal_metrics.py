"""Per-layer quality metrics of a measured refusal direction, all computed in float64.

Notation for one layer: h+ / h- the harmful / harmless mean, r = h+ - h- the raw refusal vector
(the file's `refuse_L`), d the unit direction (`refusenorm_L`, possibly orthogonalised against h-),
v+ / v- the per-dimension variances. A metric that is undefined (a zero vector in a cosine, no
variances in the file) is None and is shown as "n/a".

The definitions, and why the score combines what it combines, are in docs/analyze.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from lib.core.errors import UserError
from lib.measure.measurements import LayerMeasurement, Measurements


@dataclass(frozen=True)
class LayerSignal:
    index: int  # residual-stream index: the stream entering decoder layer `index`
    harmful_norm: float
    harmless_norm: float
    refusal_norm: float
    cos_harmful_harmless: float | None
    cos_harmful_direction: float | None
    cos_harmless_direction: float | None
    relative_magnitude: float | None  # |r| / max(|h+|, |h-|)
    separation: float | None  # (r.d)^2 / pooled variance along d; None without variances
    purity: float | None  # |r orthogonal to h-| / |r|
    score: float
    cos_previous: float | None  # cosine of d with the previous layer's d


@dataclass(frozen=True)
class SignalReport:
    layers: list[LayerSignal]
    direction_cosines: np.ndarray  # [layers, layers] cosines between directions; NaN where one is zero
    has_variances: bool  # every layer has both variances, so the score includes the separation

    def layer(self, index: int) -> LayerSignal:
        return self.layers[index]

    def direction_cosine(self, first: int, second: int) -> float | None:
        """The cosine between the directions at two residual indices; None where either direction is zero."""
        value = float(self.direction_cosines[first, second])
        return None if math.isnan(value) else value


def cosine(first: torch.Tensor, second: torch.Tensor) -> float | None:
    """Cosine similarity in float64, None when either vector is zero."""
    first, second = first.double(), second.double()
    norms = float(first.norm()) * float(second.norm())
    return float(first @ second) / norms if norms > 0 else None


def separation_factor(separation: float) -> float:
    """Map a separation S >= 0 to S / (1 + S) in [0, 1): ~0 within the noise, ~1 far above it."""
    return separation / (1.0 + separation)


def signal_score(relative_magnitude: float | None, purity: float | None, separation: float | None) -> float:
    """relative magnitude x purity [x S / (1 + S)]; an undefined factor means no usable signal."""
    if relative_magnitude is None or purity is None:
        return 0.0
    score = relative_magnitude * purity
    return score if separation is None else score * separation_factor(separation)


def projected_separation(layer: LayerMeasurement) -> float | None:
    """(r.d)^2 over the pooled variance along d, treating each covariance as diagonal.

    With diagonal covariance diag(v) the variance of x.d is sum_i v_i d_i^2; the pooled variance
    is the mean of the harmful and harmless ones. The stored variances are per dimension only, so
    correlations between dimensions are ignored (the diagonal approximation). None without
    variances, without a direction, or when the pooled variance along d is zero (nothing to compare with).
    """
    if layer.harmful_variance is None or layer.harmless_variance is None or not layer.has_direction:
        return None
    direction = layer.direction.double()
    squared = direction * direction
    pooled = 0.5 * (
        float(layer.harmful_variance.double() @ squared) + float(layer.harmless_variance.double() @ squared)
    )
    difference = float(layer.refusal.double() @ direction) ** 2
    return difference / pooled if pooled > 0 else None


def purity(refusal: torch.Tensor, harmless_mean: torch.Tensor) -> float | None:
    """Share of |r| orthogonal to the harmless mean: sqrt(1 - cos(r, h-)^2); None when r = 0."""
    refusal_norm = float(refusal.double().norm())
    if refusal_norm == 0.0:
        return None
    harmless_norm = float(harmless_mean.double().norm())
    if harmless_norm == 0.0:
        return 1.0  # a zero harmless mean has no component to share
    unit = harmless_mean.double() / harmless_norm
    orthogonal = refusal.double() - float(refusal.double() @ unit) * unit
    return float(orthogonal.norm()) / refusal_norm


def layer_signal(
    index: int, layer: LayerMeasurement, previous: LayerMeasurement | None, use_separation: bool
) -> LayerSignal:
    harmful, harmless, refusal = (
        layer.harmful_mean.double(),
        layer.harmless_mean.double(),
        layer.refusal.double(),
    )
    harmful_norm, harmless_norm, refusal_norm = (
        float(harmful.norm()),
        float(harmless.norm()),
        float(refusal.norm()),
    )
    largest_mean = max(harmful_norm, harmless_norm)
    relative_magnitude = refusal_norm / largest_mean if largest_mean > 0 else None
    separation = projected_separation(layer)
    layer_purity = purity(refusal, harmless)
    return LayerSignal(
        index=index,
        harmful_norm=harmful_norm,
        harmless_norm=harmless_norm,
        refusal_norm=refusal_norm,
        cos_harmful_harmless=cosine(harmful, harmless),
        cos_harmful_direction=cosine(harmful, layer.direction),
        cos_harmless_direction=cosine(harmless, layer.direction),
        relative_magnitude=relative_magnitude,
        separation=separation,
        purity=layer_purity,
        score=signal_score(relative_magnitude, layer_purity, separation if use_separation else None),
        cos_previous=cosine(layer.direction, previous.direction) if previous is not None else None,
    )


def direction_cosine_matrix(measurements: Measurements) -> np.ndarray:
    directions = torch.stack(
        [measurements.layers[index].direction.double() for index in sorted(measurements.layers)]
    )
    norms = directions.norm(dim=1, keepdim=True)
    units = torch.where(
        norms > 0, directions / norms.clamp_min(1e-300), torch.full_like(directions, math.nan)
    )
    return (units @ units.T).clamp(-1.0, 1.0).numpy()


def analyze_measurements(measurements: Measurements) -> SignalReport:
    """Every layer's metrics; the means are required (llm-abliteration files have them too)."""
    for index, layer in sorted(measurements.layers.items()):
        if layer.harmful_mean is None or layer.harmless_mean is None:
            raise UserError(
                f"{measurements.source}: layer {index} has no 'harmful_{index}'/'harmless_{index}' means; "
                "analysis needs both means at every layer"
            )
    indices = sorted(measurements.layers)
    # The separation enters the score only when every layer has variances, so scores stay comparable.
    has_variances = all(
        layer.harmful_variance is not None and layer.harmless_variance is not None
        for layer in measurements.layers.values()
    )
    signals = [
        layer_signal(index, measurements.layers[index], measurements.layers.get(index - 1), has_variances)
        for index in indices
    ]
    return SignalReport(
        layers=signals, direction_cosines=direction_cosine_matrix(measurements), has_variances=has_variances
    )
