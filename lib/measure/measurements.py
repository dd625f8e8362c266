"""The measurement file (SPEC §2): per-layer means, refusal directions, variances and metadata.

One flat dict saved with `torch.save`, always read with `torch.load(weights_only=True)`.
Files written by llm-abliteration style tools (keys `layers`, `harmful_L`, `harmless_L`,
`refuse_L`, `refusenorm_L`, no variances, no meta) are accepted as input too.

Index convention: L is the residual stream entering decoder layer L (the same as transformers'
`hidden_states[L]`); L = 0 is the embedding output and L = N the last decoder layer's output
before the final norm.
"""

from __future__ import annotations

import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lib.core.atomic import atomic_file
from lib.core.errors import UserError


@dataclass(frozen=True)
class LayerMeasurement:
    """What was measured on the residual stream entering one layer."""

    harmful_mean: torch.Tensor | None
    harmless_mean: torch.Tensor | None
    refusal: torch.Tensor  # raw harmful_mean - harmless_mean
    # Unit vector (orthogonalised against harmless_mean if measured --projected), or all zeros where
    # the two means are identical: at L = 0 every prompt ends on the same template token, so the
    # embedding outputs agree exactly and there is no direction to measure.
    direction: torch.Tensor
    harmful_variance: torch.Tensor | None = None
    harmless_variance: torch.Tensor | None = None

    @property
    def has_direction(self) -> bool:
        return bool(self.direction.any())


@dataclass
class Measurements:
    num_layers: int
    layers: dict[int, LayerMeasurement]
    meta: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None

    @property
    def hidden_size(self) -> int:
        return next(iter(self.layers.values())).direction.numel()

    def model_mismatches(self, num_layers: int | None, hidden_size: int | None) -> dict[str, tuple[Any, int]]:
        """Where a model differs from the measured one: config key -> (the model's value, the measured one).

        Keys `num_hidden_layers` and `hidden_size`, in that order; a size given as None (unknown) is not
        compared.
        """
        measured = {
            "num_hidden_layers": (num_layers, self.num_layers),
            "hidden_size": (hidden_size, self.hidden_size),
        }
        return {
            key: (actual, expected)
            for key, (actual, expected) in measured.items()
            if actual is not None and actual != expected
        }

    def layer(self, index: int) -> LayerMeasurement:
        if index not in self.layers:
            raise UserError(
                f"{self.source}: has no measurement for layer {index}; "
                f"available: {min(self.layers)}..{max(self.layers)}"
            )
        return self.layers[index]

    def direction(self, index: int) -> torch.Tensor:
        """The unit refusal direction of layer `index`, float32; an error where it is zero."""
        layer = self.layer(index)
        if not layer.has_direction:
            raise UserError(
                f"{self.source}: layer {index} has no refusal direction (harmful and harmless means are "
                "identical there); use another measurement layer"
            )
        return layer.direction


def measurement_dict(measurements: Measurements) -> dict[str, Any]:
    """The flat, llm-abliteration compatible dict of SPEC §2."""
    flat: dict[str, Any] = {"layers": measurements.num_layers}
    for index, layer in sorted(measurements.layers.items()):
        named = {
            "harmful": layer.harmful_mean,
            "harmless": layer.harmless_mean,
            "refuse": layer.refusal,
            "refusenorm": layer.direction,
            "harmful_var": layer.harmful_variance,
            "harmless_var": layer.harmless_variance,
        }
        for prefix, tensor in named.items():
            if tensor is not None:
                flat[f"{prefix}_{index}"] = tensor.detach().to(torch.float32).cpu().contiguous()
    flat["meta"] = dict(measurements.meta)
    return flat


# What torch.load(weights_only=True) says it refused, inside a long message that suggests unsafe loading.
_REFUSED_BY_SAFE_UNPICKLER = re.compile(r"WeightsUnpickler error:\s*([^\n]+?)(?:\. |\n|$)")
_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
# Per residual layer: both means, the raw and the unit refusal vector, both variances (SPEC §2).
VECTORS_PER_LAYER = 6
# Beyond the float32 vectors: torch.save's zip entry, alignment and pickle record per tensor (a few
# hundred bytes), and the meta record, generously rounded up.
_BYTES_PER_VECTOR_RECORD = 1024
_META_BYTES = 64 << 10


def estimated_file_bytes(num_layers: int, hidden_size: int) -> int:
    """At least the size of the file `save_measurements` writes for a model of this shape."""
    vectors = VECTORS_PER_LAYER * (num_layers + 1)
    return vectors * (4 * hidden_size + _BYTES_PER_VECTOR_RECORD) + _META_BYTES


def save_measurements(measurements: Measurements, path: Path) -> None:
    """Write atomically: the file appears under `path` only when complete."""
    with atomic_file(Path(path)) as temporary, open(temporary, "wb") as handle:
        # Into a Python file object: a full disk then raises OSError (ENOSPC) rather than a RuntimeError
        # of torch's own writer that does not say why.
        torch.save(measurement_dict(measurements), handle)


def load_measurements(path: Path) -> Measurements:
    """Read and validate a measurement file; every problem is a one-line UserError naming the file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: measurement file not found")
    if not path.is_file():
        raise UserError(f"{path}: not a regular file (expected a .pt measurement file)")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(
            f"{path}: not a measurement file "
            f"(expected a torch.save'd dict of plain tensors; {_load_failure(error)})"
        ) from None
    return parse_measurements(raw, path)


def _load_failure(error: Exception) -> str:
    """Why torch.load failed, in one line: its own messages span many lines or say only `KeyError: 101`."""
    if isinstance(error, OSError) and error.strerror:
        return f"cannot read it: {error.strerror}"
    refused = _REFUSED_BY_SAFE_UNPICKLER.search(str(error))
    if isinstance(error, pickle.UnpicklingError) and refused:
        return f"the safe loader refused it: {refused[1].strip()}"
    text = str(error).strip()
    return f"torch.load failed: {type(error).__name__}" + (f": {text.splitlines()[0]}" if text else "")


def parse_measurements(raw: Any, path: Path) -> Measurements:
    if not isinstance(raw, dict) or "layers" not in raw:
        raise UserError(f"{path}: not a measurement file (expected a dict with a 'layers' key)")
    odd_keys = [key for key in raw if not isinstance(key, str)]
    if odd_keys:
        raise UserError(f"{path}: not a measurement file (key {odd_keys[0]!r} is not a string)")
    num_layers = raw["layers"]
    is_integer_tensor = isinstance(num_layers, torch.Tensor) and num_layers.dtype in _INTEGER_DTYPES
    if is_integer_tensor and num_layers.numel() == 1:
        num_layers = int(num_layers.item())
    if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
        raise UserError(f"{path}: key 'layers' must be a positive integer, got {num_layers!r}")
    layer_indices = sorted(
        {
            int(key.rsplit("_", 1)[1])
            for key in raw
            if key.startswith(("refuse_", "refusenorm_", "harmful_")) and key.rsplit("_", 1)[1].isdigit()
        }
    )
    if not layer_indices:
        raise UserError(f"{path}: contains no per-layer vectors (keys like 'refuse_0')")
    _check_layer_coverage(layer_indices, num_layers, path)
    layers = {index: _parse_layer(raw, index, path) for index in layer_indices}
    sizes = {layer.direction.numel() for layer in layers.values()}
    if len(sizes) != 1:
        raise UserError(f"{path}: per-layer vectors have different sizes {sorted(sizes)}")
    if not any(layer.has_direction for layer in layers.values()):
        raise UserError(f"{path}: the refusal direction is zero at every layer (the two means agree)")
    meta = raw.get("meta", {})
    meta = meta if isinstance(meta, dict) else {}
    return Measurements(num_layers=num_layers, layers=layers, meta=meta, source=path)


def _check_layer_coverage(layer_indices: list[int], num_layers: int, path: Path) -> None:
    """Every residual index from 0 must be present: 0..N (ours) or 0..N-1 (llm-abliteration's measure)."""
    beyond = [index for index in layer_indices if index > num_layers]
    if beyond:
        raise UserError(
            f"{path}: has layer {beyond[0]} but 'layers' is {num_layers} (allowed: 0..{num_layers})"
        )
    last = num_layers if num_layers in layer_indices else num_layers - 1
    missing = sorted(set(range(last + 1)) - set(layer_indices))
    if missing:
        listed = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
        raise UserError(
            f"{path}: missing layer(s) {listed}; expected vectors for every layer 0..{num_layers} "
            f"(or 0..{num_layers - 1} in llm-abliteration files)"
        )


def _vector(raw: dict[str, Any], key: str, path: Path, required: bool) -> torch.Tensor | None:
    value = raw.get(key)
    if value is None:
        if required:
            raise UserError(f"{path}: missing key '{key}'")
        return None
    if not isinstance(value, torch.Tensor):
        raise UserError(f"{path}: key '{key}' must be a tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise UserError(f"{path}: key '{key}' must be a floating-point tensor, got {value.dtype}")
    vector = value.detach().to(torch.float32).flatten()
    if not torch.isfinite(vector).all():
        raise UserError(f"{path}: key '{key}' contains NaN or infinite values")
    return vector


def _parse_layer(raw: dict[str, Any], index: int, path: Path) -> LayerMeasurement:
    harmful = _vector(raw, f"harmful_{index}", path, required=False)
    harmless = _vector(raw, f"harmless_{index}", path, required=False)
    refusal = _vector(raw, f"refuse_{index}", path, required=False)
    if refusal is None:
        if harmful is None or harmless is None:
            raise UserError(f"{path}: layer {index} needs 'refuse_{index}' or both harmful/harmless means")
        refusal = harmful - harmless
    direction = _vector(raw, f"refusenorm_{index}", path, required=False)
    if direction is None:
        direction = refusal
    norm = float(direction.double().norm())
    if not math.isfinite(norm):
        raise UserError(f"{path}: refusal direction of layer {index} overflows")
    unit = (direction.double() / norm).to(torch.float32) if norm > 0 else torch.zeros_like(direction)
    layer = LayerMeasurement(
        harmful_mean=harmful,
        harmless_mean=harmless,
        refusal=refusal,
        direction=unit,
        harmful_variance=_variance(raw, f"harmful_var_{index}", path),
        harmless_variance=_variance(raw, f"harmless_var_{index}", path),
    )
    sizes = {vector.numel() for vector in vars(layer).values() if isinstance(vector, torch.Tensor)}
    if len(sizes) != 1:
        raise UserError(f"{path}: the vectors of layer {index} have different sizes {sorted(sizes)}")
    return layer


def _variance(raw: dict[str, Any], key: str, path: Path) -> torch.Tensor | None:
    variance = _vector(raw, key, path, required=False)
    if variance is not None and bool((variance < 0).any()):
        raise UserError(f"{path}: key '{key}' has negative entries (a variance must be >= 0)")
    return variance
