"""The math of SPEC §4: direction preparation and the in-place projection of one tensor.

Directions are prepared in float64. A tensor is edited in place, a block of rows at a time: each
block is converted to float32 on the compute device, projected and written back in the tensor's
own dtype, so the extra memory is one block, whatever the tensor's size.

Two layouts cover every rule (see lib/ablate/architectures.py):
* residual axis first, `nn.Linear` [hidden, in] (or such matrices stacked per expert): each column v
  is a vector written to the residual stream; `W' = W - s d (dᵀ W)`.
* residual axis last, [..., hidden]: each row v lives in residual space (fused GPT-OSS experts,
  biases, routers, embeddings); `W' = W - s (W d) dᵀ`.
The norm-preserving variant rescales every such vector back to its original length afterwards.
"""

from __future__ import annotations

import math

import torch

from lib.ablate.architectures import RESIDUAL_FIRST, RESIDUAL_LAST

# Rows are edited a block at a time in a float32 workspace: on the CPU small enough to stay in cache
# (which makes the two passes over a [hidden, in] matrix cheaper than one pass over all of it),
# on a GPU large enough to keep the number of transfers and kernel launches low.
_CPU_BLOCK_ELEMENTS = 1 << 18
_GPU_BLOCK_ELEMENTS = 1 << 24


class DegenerateDirectionError(ValueError):
    """A direction that is zero or not finite, so it cannot be normalised."""


def unit(vector: torch.Tensor) -> torch.Tensor:
    """`vector / |vector|` in float64; refuses zero and non-finite vectors."""
    vector = vector.detach().to(torch.float64).flatten()
    norm = float(vector.norm())
    if not torch.isfinite(vector).all() or not math.isfinite(norm):
        raise DegenerateDirectionError("the direction has NaN or infinite components")
    if norm == 0.0:
        raise DegenerateDirectionError("the direction is zero")
    return vector / norm


def interpolated(lower: torch.Tensor, upper: torch.Tensor, fraction: float) -> torch.Tensor:
    """The unit direction `fraction` of the way from `lower` to `upper`."""
    return unit((1.0 - fraction) * unit(lower) + fraction * unit(upper))


def mean_direction(directions: list[torch.Tensor]) -> torch.Tensor:
    """The normalised mean of unit directions."""
    return unit(torch.stack([unit(direction) for direction in directions]).mean(dim=0))


def orthogonalized(direction: torch.Tensor, against: torch.Tensor) -> torch.Tensor:
    """Projected (biprojected) direction: `normalize(d - (d·â) â)`."""
    direction, against = unit(direction), unit(against)
    return unit(direction - (direction @ against) * against)


def sparsified(direction: torch.Tensor, fraction: float) -> torch.Tensor:
    """Keep the ⌈fraction·n⌉ largest-magnitude components, zero the rest, renormalise."""
    direction = unit(direction)
    if fraction >= 1.0:
        return direction
    kept = max(1, math.ceil(fraction * direction.numel()))
    mask = torch.zeros_like(direction, dtype=torch.bool)
    mask[direction.abs().topk(kept).indices] = True
    return unit(torch.where(mask, direction, torch.zeros_like(direction)))


def through_gain(direction: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """`normalize(g ⊙ d)`: the direction as seen before a norm whose gain is `g`."""
    return unit(gain.to(torch.float64) * unit(direction))


def project_out(
    tensor: torch.Tensor,
    direction: torch.Tensor,
    scale: float,
    residual_axis: int,
    norm_preserving: bool = False,
    device: torch.device | str = "cpu",
) -> None:
    """Remove `scale` times the `direction` component from every residual-space vector of `tensor`, in place."""
    direction = direction.to(device=device, dtype=torch.float32)
    if residual_axis == RESIDUAL_FIRST:
        if tensor.dim() < 2:
            raise ValueError(
                f"a [..., hidden, in] writer needs two axes or more, got shape {tuple(tensor.shape)}"
            )
        for matrix in tensor.view(-1, *tensor.shape[-2:]):  # one [hidden, in] matrix per expert
            _project_columns(matrix, direction, scale, norm_preserving, device)
    elif residual_axis == RESIDUAL_LAST:
        _project_rows(tensor.view(-1, tensor.shape[-1]), direction, scale, norm_preserving, device)
    else:
        raise ValueError(f"unknown residual axis {residual_axis}")


def _row_blocks(rows: int, row_length: int, device: torch.device | str) -> list[slice]:
    elements = _GPU_BLOCK_ELEMENTS if torch.device(device).type == "cuda" else _CPU_BLOCK_ELEMENTS
    block = max(1, elements // max(1, row_length))
    return [slice(start, min(start + block, rows)) for start in range(0, rows, block)]


def _in_float32(source: torch.Tensor, workspace: torch.Tensor) -> torch.Tensor:
    """`source` converted into the reused float32 `workspace` (fresh buffers would be page-faulted in each time)."""
    values = workspace[: source.numel()].view(source.shape)
    values.copy_(source)
    return values


def _workspace(blocks: list[slice], row_length: int, device: torch.device | str) -> torch.Tensor:
    rows = max(block.stop - block.start for block in blocks)
    return torch.empty(rows * row_length, dtype=torch.float32, device=device)


def _norm_restoring_factors(
    squared_norms: torch.Tensor, coefficients: torch.Tensor, scale: float
) -> torch.Tensor:
    """Per vector, `|v| / |v - s c d|` with `c = v·d` and |d| = 1; 1 where the result would vanish."""
    squared_norms, coefficients = squared_norms.double(), coefficients.double()
    remaining = squared_norms - (2.0 * scale - scale * scale) * coefficients.square()
    usable = remaining > squared_norms * 1e-12
    factors = torch.ones_like(squared_norms)
    factors[usable] = (squared_norms[usable] / remaining[usable]).sqrt()
    return factors.float()


def _project_rows(
    rows: torch.Tensor,
    direction: torch.Tensor,
    scale: float,
    norm_preserving: bool,
    device: torch.device | str,
) -> None:
    blocks = _row_blocks(*rows.shape, device)
    workspace = _workspace(blocks, rows.shape[1], device)
    for block in blocks:
        values = _in_float32(rows[block], workspace)
        coefficients = values @ direction
        squared_norms = values.square().sum(dim=1) if norm_preserving else None
        values.addr_(coefficients, direction, alpha=-scale)
        if squared_norms is not None:
            values.mul_(_norm_restoring_factors(squared_norms, coefficients, scale).unsqueeze(1))
        rows[block].copy_(values)


def _project_columns(
    matrix: torch.Tensor,
    direction: torch.Tensor,
    scale: float,
    norm_preserving: bool,
    device: torch.device | str,
) -> None:
    # Columns span every row, so a first pass accumulates each column's dᵀv (and |v|²), a second edits.
    blocks = _row_blocks(*matrix.shape, device)
    workspace = _workspace(blocks, matrix.shape[1], device)
    coefficients = torch.zeros(matrix.shape[1], dtype=torch.float64, device=device)
    squared_norms = torch.zeros_like(coefficients)
    for block in blocks:
        values = _in_float32(matrix[block], workspace)
        coefficients += (direction[block] @ values).double()
        if norm_preserving:
            squared_norms += values.square().sum(dim=0).double()
    factors = _norm_restoring_factors(squared_norms, coefficients, scale) if norm_preserving else None
    coefficients = coefficients.float()
    for block in blocks:
        values = _in_float32(matrix[block], workspace)
        values.addr_(direction[block], coefficients, alpha=-scale)
        if factors is not None:
            values.mul_(factors.unsqueeze(0))
        matrix[block].copy_(values)
