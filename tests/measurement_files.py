"""Synthetic measurement files: random ones for the stages that only need a valid file, and ones with
known geometry for analyze's tests.

`random_measurements` / `write_measurements` draw random means and unit directions for every layer.
`planted_measurements` builds a file whose refusal signal is known in closed form:
- the harmless means live in coordinates 0..15, every refusal vector in coordinates 16.., so each
  refusal vector is orthogonal to its harmless mean (purity 1) and |harmful|^2 = |harmless|^2 + a^2;
- layer L's refusal vector is a_L * d_L with d_L = alignment_L * PLANTED + sqrt(1 - alignment_L^2) * own_L,
  where PLANTED (coordinate 16) is shared and own_L (coordinate 17 + L) is private to layer L, so
  cos(d_L, d_M) = alignment_L * alignment_M for L != M;
- every variance is `variance` in every dimension, so the separation is a_L^2 / variance;
- layer 0 has identical means, as in a real file (every prompt ends on the same template token).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from lib.measure.measurements import LayerMeasurement, Measurements, save_measurements

HIDDEN_SIZE = 64
HARMLESS_DIMENSIONS = 16
PLANTED_COORDINATE = 16
HARMLESS_NORM = 10.0


def random_measurements(
    hidden_size: int, num_layers: int, seed: int = 0, *, like_measure: bool = False, model: str = "fixture"
) -> Measurements:
    """Random per-layer means and unit directions, L = 0..num_layers.

    `like_measure`: L = 0 (the embedding output, where every chat-formatted prompt ends in the same
    token) has equal means and no direction, as in files measure.py writes, so a plan that uses
    measurement 0 fails.
    """
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for index in range(num_layers + 1):
        harmful, harmless = (
            torch.randn(hidden_size, generator=generator),
            torch.randn(hidden_size, generator=generator),
        )
        if index == 0 and like_measure:
            harmful = harmless.clone()
        refusal = harmful - harmless
        norm = refusal.norm()
        layers[index] = LayerMeasurement(harmful, harmless, refusal, refusal / norm if norm > 0 else refusal)
    return Measurements(num_layers, layers, meta={"model": model})


def write_measurements(
    path: Path, hidden_size: int, num_layers: int, seed: int = 0, **options
) -> Measurements:
    """`random_measurements` saved as a measurement file at `path`."""
    measurements = random_measurements(hidden_size, num_layers, seed, **options)
    save_measurements(measurements, path)
    return measurements


def unit(index: int, hidden_size: int = HIDDEN_SIZE) -> torch.Tensor:
    vector = torch.zeros(hidden_size, dtype=torch.float64)
    vector[index] = 1.0
    return vector


def planted_direction(layer: int, alignment: float) -> torch.Tensor:
    return alignment * unit(PLANTED_COORDINATE) + math.sqrt(max(0.0, 1.0 - alignment**2)) * unit(
        PLANTED_COORDINATE + 1 + layer
    )


def planted_measurements(
    magnitudes: Sequence[float],
    alignments: Sequence[float],
    *,
    num_layers: int | None = None,
    variance: float | None = 4.0,
    llm_abliteration_style: bool = False,
    seed: int = 0,
) -> dict[str, object]:
    """A flat measurement dict for residual layers 0..len(magnitudes)-1 (magnitudes[0] should be 0).

    `num_layers` defaults to len(magnitudes) - 1 (our format, 0..N). `llm_abliteration_style`
    writes only `layers`, `harmful_L`, `harmless_L`, `refuse_L` with N = len(magnitudes) (0..N-1).
    """
    assert len(magnitudes) == len(alignments) and len(magnitudes) - 1 < HIDDEN_SIZE - PLANTED_COORDINATE - 1
    generator = torch.Generator().manual_seed(seed)
    if num_layers is None:
        num_layers = len(magnitudes) if llm_abliteration_style else len(magnitudes) - 1
    content: dict[str, object] = {"layers": num_layers}
    for layer, (magnitude, alignment) in enumerate(zip(magnitudes, alignments, strict=True)):
        harmless = torch.zeros(HIDDEN_SIZE, dtype=torch.float64)
        harmless[:HARMLESS_DIMENSIONS] = torch.randn(
            HARMLESS_DIMENSIONS, generator=generator, dtype=torch.float64
        )
        harmless *= HARMLESS_NORM / harmless.norm()
        refusal = magnitude * planted_direction(layer, alignment)
        content[f"harmful_{layer}"] = (harmless + refusal).float()
        content[f"harmless_{layer}"] = harmless.float()
        content[f"refuse_{layer}"] = refusal.float()
        if llm_abliteration_style:
            continue
        content[f"refusenorm_{layer}"] = (refusal / refusal.norm() if magnitude else refusal).float()
        if variance is not None:
            content[f"harmful_var_{layer}"] = torch.full((HIDDEN_SIZE,), variance)
            content[f"harmless_var_{layer}"] = torch.full((HIDDEN_SIZE,), variance)
    if not llm_abliteration_style:
        content["meta"] = {"model": "synthetic", "hidden_size": HIDDEN_SIZE, "num_layers": num_layers}
    return content


def save(content: dict[str, object], path: Path) -> Path:
    torch.save(content, path)
    return path
