"""The math of SPEC §4 against the formulas written out in float64."""

from __future__ import annotations

import math

import pytest
import torch

from lib.ablate.architectures import RESIDUAL_FIRST, RESIDUAL_LAST
from lib.ablate.projection import (
    DegenerateDirectionError,
    interpolated,
    mean_direction,
    orthogonalized,
    project_out,
    sparsified,
    through_gain,
    unit,
)

HIDDEN = 96


def random(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("scale", [1.0, 0.5, -1.0])
def test_writer_columns_follow_the_formula(scale: float) -> None:
    weights, direction = random(HIDDEN, 80), unit(random(HIDDEN, seed=1))
    edited = weights.float().clone()
    project_out(edited, direction, scale, RESIDUAL_FIRST)
    expected = weights - scale * torch.outer(direction, direction @ weights)
    assert torch.allclose(edited.double(), expected, atol=1e-5)


def test_writer_columns_spanning_several_blocks() -> None:
    # 2048 x 1500 spans a dozen CPU blocks, so the two-pass accumulation over blocks is exercised.
    weights = torch.randn(2048, 1500, generator=torch.Generator().manual_seed(0))
    direction = unit(random(2048, seed=1))
    edited = weights.clone()
    project_out(edited, direction, 1.0, RESIDUAL_FIRST)
    expected = weights.double() - torch.outer(direction, direction @ weights.double())
    assert torch.allclose(edited.double(), expected, atol=1e-4)
    assert (direction @ edited.double()).abs().max() < 1e-3


@pytest.mark.parametrize("shape", [(HIDDEN,), (4, HIDDEN), (3, 50, HIDDEN)])
def test_rows_in_residual_space_follow_the_formula(shape: tuple[int, ...]) -> None:
    weights, direction = random(*shape), unit(random(HIDDEN, seed=1))
    edited = weights.float().clone()
    project_out(edited, direction, 1.0, RESIDUAL_LAST)
    expected = weights - torch.einsum("...h,h,k->...k", weights, direction, direction)
    assert torch.allclose(edited.double(), expected, atol=1e-5)


@pytest.mark.parametrize("axis", [RESIDUAL_FIRST, RESIDUAL_LAST])
def test_norm_preserving_keeps_each_written_vector_length(axis: int) -> None:
    weights, direction = random(HIDDEN, 80), unit(random(HIDDEN, seed=1))
    if axis == RESIDUAL_LAST:
        weights = weights.T.contiguous()
    edited = weights.float().clone()
    project_out(edited, direction, 1.0, axis, norm_preserving=True)
    vectors_before = weights if axis == RESIDUAL_LAST else weights.T
    vectors_after = edited.double() if axis == RESIDUAL_LAST else edited.double().T
    assert torch.allclose(vectors_after.norm(dim=1), vectors_before.norm(dim=1), rtol=1e-5)
    assert (vectors_after @ direction).abs().max() < 1e-5
    removed = vectors_before - torch.outer(vectors_before @ direction, direction)
    expected = removed * (vectors_before.norm(dim=1) / removed.norm(dim=1)).unsqueeze(1)
    assert torch.allclose(vectors_after, expected, atol=1e-5)


def test_bfloat16_tensors_are_computed_in_float32_and_cast_back() -> None:
    weights, direction = random(HIDDEN, 64).to(torch.bfloat16), unit(random(HIDDEN, seed=1))
    edited = weights.clone()
    project_out(edited, direction, 1.0, RESIDUAL_FIRST)
    expected = weights.double() - torch.outer(direction, direction @ weights.double())
    assert edited.dtype == torch.bfloat16
    assert torch.allclose(edited.double(), expected, rtol=2**-7, atol=1e-2)  # within bfloat16 rounding
    assert ((direction @ edited.double()).abs() / edited.double().norm(dim=0)).max() < 0.01


def test_sparsity_keeps_the_largest_components() -> None:
    direction = torch.tensor([0.1, -3.0, 0.5, 2.0, -0.2, 1.0, 0.0, 0.05], dtype=torch.float64)
    kept = sparsified(direction, 0.3)  # ceil(0.3 * 8) = 3 components
    assert kept.nonzero().flatten().tolist() == [1, 3, 5]
    assert math.isclose(float(kept.norm()), 1.0)
    assert torch.allclose(kept[[1, 3, 5]], direction[[1, 3, 5]] / direction[[1, 3, 5]].norm())
    assert sparsified(direction, 1.0).equal(unit(direction))


def test_direction_preparation_formulas() -> None:
    first, second, harmless = unit(random(HIDDEN)), unit(random(HIDDEN, seed=1)), random(HIDDEN, seed=2)
    assert torch.allclose(interpolated(first, second, 0.25), unit(0.75 * first + 0.25 * second))
    assert torch.allclose(mean_direction([first, 3 * second]), unit(first + second))
    projected = orthogonalized(first, harmless)
    assert abs(float(projected @ harmless)) < 1e-12 and math.isclose(float(projected.norm()), 1.0)
    assert torch.allclose(projected, unit(first - (first @ unit(harmless)) * unit(harmless)))
    gain = random(HIDDEN, seed=3).abs() + 0.5
    assert torch.allclose(through_gain(first, gain), unit(gain * first))


@pytest.mark.parametrize(
    "vector, message", [(torch.zeros(4), "zero"), (torch.tensor([1.0, float("inf")]), "infinite")]
)
def test_degenerate_directions_are_refused(vector: torch.Tensor, message: str) -> None:
    with pytest.raises(DegenerateDirectionError, match=message):
        unit(vector)
