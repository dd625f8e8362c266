"""Refusal directions from harmful and harmless residual statistics (docs/SPEC.md §2, §4)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import PreTrainedModel

from lib import __version__
from lib.core.loading import quantization_description, text_config
from lib.core.prompts import file_sha256
from lib.measure.measurements import LayerMeasurement, Measurements
from lib.measure.residual_capture import ResidualStatistics


def unit_or_zero(vector: torch.Tensor) -> torch.Tensor:
    """`vector / |vector|`, or zeros where the vector is zero and so has no direction.

    The embedding output (L = 0) is such a case: every chat-templated prompt ends in the same
    token, so harmful and harmless means are identical there.
    """
    norm = vector.norm()
    return vector / norm if norm > 0 else torch.zeros_like(vector)


def refusal_direction(
    harmful_mean: torch.Tensor, harmless_mean: torch.Tensor, projected: bool
) -> torch.Tensor:
    """Unit `harmful - harmless`; with `projected`, first orthogonalised against the harmless mean."""
    refusal = harmful_mean.double() - harmless_mean.double()
    if projected:
        harmless_unit = unit_or_zero(harmless_mean.double())
        refusal = refusal - (refusal @ harmless_unit) * harmless_unit
    return unit_or_zero(refusal)


def refusal_measurements(
    harmful: ResidualStatistics, harmless: ResidualStatistics, projected: bool, meta: dict[str, Any]
) -> Measurements:
    """Per-layer means, variances, raw and unit refusal directions for L = 0..N (computed in float64)."""
    if harmful.mean.shape != harmless.mean.shape:
        raise ValueError(
            f"harmful {tuple(harmful.mean.shape)} and harmless {tuple(harmless.mean.shape)} differ"
        )
    layers = {}
    for index in range(harmful.mean.shape[0]):
        harmful_mean, harmless_mean = harmful.mean[index], harmless.mean[index]
        layers[index] = LayerMeasurement(
            harmful_mean=harmful_mean.float(),
            harmless_mean=harmless_mean.float(),
            refusal=(harmful_mean - harmless_mean).float(),
            direction=refusal_direction(harmful_mean, harmless_mean, projected).float(),
            harmful_variance=harmful.variance[index].float(),
            harmless_variance=harmless.variance[index].float(),
        )
    return Measurements(num_layers=harmful.mean.shape[0] - 1, layers=layers, meta=meta)


def measurement_meta(
    *,
    model_name: str,
    model: PreTrainedModel,
    prompt_files: dict[str, Path],
    prompt_counts: dict[str, int],
    projected: bool,
    settings: dict[str, Any],
) -> dict[str, Any]:
    """The `meta` record of SPEC §2: plain Python values only, so `torch.load(weights_only=True)` reads it."""
    config = text_config(model.config)
    return {
        "model": model_name,
        "model_type": model.config.model_type,
        "text_model_type": config.model_type,
        "hidden_size": config.hidden_size,
        "num_layers": config.num_hidden_layers,
        "dtype": str(model.dtype).removeprefix("torch."),
        "quantization": quantization_description(model),
        "prompt_counts": dict(prompt_counts),
        "prompt_files": {name: str(path) for name, path in prompt_files.items()},
        "prompt_sha256": {name: file_sha256(path) for name, path in prompt_files.items()},
        "projected": projected,
        "position": "last prompt token (after the generation prompt)",
        "index_convention": (
            "L = residual entering decoder layer L; 0 = embedding output, "
            "N = last layer output before the final norm"
        ),
        "variance": "per-dimension sample variance (divisor n - 1)",
        **settings,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tool": "measure.py",
        "tool_version": __version__,
        "transformers_version": str(transformers.__version__),
        "torch_version": str(torch.__version__),  # TorchVersion is not a plain str for weights_only loads
    }
