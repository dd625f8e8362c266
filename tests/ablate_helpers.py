"""Shared pieces of the sharded_ablate tests: plans, runs and residual-write probes."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
import yaml
from safetensors import safe_open

import sharded_ablate
from lib.core.errors import run_cli
from lib.core.loading import decoder_layers
from tests.fixtures import DEFAULT_NUM_LAYERS, HIDDEN_SIZE
from tests.measurement_files import write_measurements


def write_plan(path: Path, plan: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


def write_raw_safetensors(path: Path, header: Any, data: bytes) -> Path:
    """A file laid out as safetensors with exactly this header (however wrong) followed by `data`."""
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


def rewrite_header(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Edit a safetensors file's header in place, keeping its data bytes as they are."""
    raw = path.read_bytes()
    (header_length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_length])
    change(header)
    write_raw_safetensors(path, header, raw[8 + header_length :])


def tree_digest(directory: Path) -> dict[str, str]:
    """Content hash of every file under `directory` (following symlinks), by relative path."""
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def make_plan(tmp_path: Path, model: str | Path, **extra) -> Path:
    """tmp_path/plan.yml: `model` ablated at layer 2 with tmp_path/m.pt (written once) into tmp_path/out."""
    if not (tmp_path / "m.pt").exists():
        write_measurements(tmp_path / "m.pt", HIDDEN_SIZE, DEFAULT_NUM_LAYERS)
    plan = {
        "model": str(model),
        "measurements": str(tmp_path / "m.pt"),
        "output": str(tmp_path / "out"),
        "ablate": [{"layer": 2}],
        **extra,
    }
    return write_plan(tmp_path / "plan.yml", plan)


class Run(NamedTuple):
    status: int
    error: str  # stderr
    output: str  # stdout


def run_ablate(arguments: Sequence[str], capsys: pytest.CaptureFixture | None = None) -> Run:
    """Run the entry script in-process exactly as the command line does."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(sharded_ablate.main, list(arguments))
    captured = capsys.readouterr() if capsys is not None else None
    return Run(exit_info.value.code, captured.err if captured else "", captured.out if captured else "")


def read_all_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    return tensors


def shard_metadata(directory: Path) -> dict[str, dict | None]:
    metadata = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            metadata[path.name] = handle.metadata()
    return metadata


def residual_writes(
    model: torch.nn.Module, layers: Sequence[int], input_ids: torch.Tensor
) -> dict[int, torch.Tensor]:
    """Everything each given decoder layer adds to the residual stream, per token: {layer: [tokens, hidden]}.

    The layer's output minus its input, whatever the family puts in between (sandwich or post norms,
    parallel blocks, linear attention, shared experts, residual multipliers): what the model really adds.
    """
    inputs: dict[int, torch.Tensor] = {}
    captured: dict[int, torch.Tensor] = {}
    handles = []
    by_index = decoder_layers(model)

    def flat(value: torch.Tensor) -> torch.Tensor:
        return value.detach().reshape(-1, value.shape[-1]).double()

    for layer in layers:

        def before(module, args, kwargs, layer=layer):
            inputs[layer] = flat(args[0] if args else kwargs["hidden_states"])

        def after(module, args, output, layer=layer):
            captured[layer] = flat(output[0] if isinstance(output, tuple) else output) - inputs[layer]

        handles.append(by_index[layer].register_forward_pre_hook(before, with_kwargs=True))
        handles.append(by_index[layer].register_forward_hook(after))
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def component_ratios(writes: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Per token, |write · d| / |write|."""
    direction = direction.double() / direction.double().norm()
    return (writes @ direction).abs() / writes.norm(dim=-1).clamp_min(1e-30)
