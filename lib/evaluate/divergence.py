"""KL divergence of the first reply token between two models, over the full vocabulary, in float64.

For each prompt, P is the original model's next-token distribution at the last prompt position
(the reply's first token) and Q the edited model's: KL(P ‖ Q) = Σ_v P(v) (log P(v) − log Q(v)),
in nats. Tokens with P(v) = 0 contribute nothing; a token with P(v) > 0 and Q(v) = 0 makes the
divergence infinite, as it mathematically is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def kl_divergence(
    reference_log_probabilities: torch.Tensor, other_log_probabilities: torch.Tensor
) -> torch.Tensor:
    """KL(reference ‖ other) of each row of two [prompts, vocab] log-probability tensors, in float64."""
    if reference_log_probabilities.shape != other_log_probabilities.shape:
        raise ValueError(
            f"log-probabilities of different shapes: {tuple(reference_log_probabilities.shape)} "
            f"and {tuple(other_log_probabilities.shape)}"
        )
    reference = reference_log_probabilities.to(torch.float64)
    other = other_log_probabilities.to(torch.float64)
    probabilities = reference.exp()
    terms = torch.where(probabilities > 0, probabilities * (reference - other), torch.zeros_like(reference))
    # Rounding can leave a tiny negative sum where the distributions agree; KL is never negative.
    return terms.sum(dim=-1).clamp(min=0.0)


@dataclass(frozen=True)
class DivergenceSummary:
    mean: float
    median: float
    maximum: float
    per_prompt: list[float]

    @classmethod
    def of(cls, per_prompt: torch.Tensor) -> DivergenceSummary:
        values = per_prompt.to(torch.float64)
        return cls(
            mean=float(values.mean()),
            median=float(values.median()),  # the lower median for an even count
            maximum=float(values.max()),
            per_prompt=[float(value) for value in values],
        )

    def as_json(self) -> dict[str, object]:
        """Plain values; JSON has no infinity, so an infinite divergence is written as null."""
        return {
            "mean": _finite_or_none(self.mean),
            "median": _finite_or_none(self.median),
            "max": _finite_or_none(self.maximum),
            "per_prompt": [_finite_or_none(value) for value in self.per_prompt],
        }


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
