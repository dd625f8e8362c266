"""A safetensors checkpoint seen through its headers: family, layout and every tensor's location.

Nothing is loaded here but the headers, the config and (on request) single tensors. MXFP4 expert
tensors of original GPT-OSS checkpoints appear as one logical tensor per `*_blocks`/`*_scales`
pair, already in the orientation of the BF16 checkpoints.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from lib.ablate import mxfp4
from lib.ablate.architectures import (
    SUPPORTED_MODEL_TYPES,
    Family,
    Layout,
    TensorRule,
    family_for,
    layer_tensor_pattern,
)
from lib.ablate.safetensors_stream import (
    DTYPE_NAMES,
    ELEMENT_SIZES,
    ShardHeader,
    StoredTensor,
    read_header,
    read_tensor,
)
from lib.core.errors import UserError
from lib.core.model_files import (
    INDEX_NAME,
    SINGLE_FILE_NAME,
    read_config,
    read_index,
    resolve_model_directory,
    text_config_of,
)


@dataclass(frozen=True)
class PackedTensor:
    """An MXFP4 `*_blocks` + `*_scales` pair, seen as the dequantised tensor it stands for."""

    name: str
    blocks: StoredTensor
    scales: StoredTensor

    @property
    def dtype(self) -> str:
        return DTYPE_NAMES[mxfp4.DEQUANTIZED_DTYPE]

    @property
    def shape(self) -> tuple[int, ...]:
        return mxfp4.dequantized_shape(self.blocks.shape)

    @property
    def nbytes(self) -> int:
        return ELEMENT_SIZES[self.dtype] * int(torch.Size(self.shape).numel())


LogicalTensor = StoredTensor | PackedTensor
# A shape as config.json determines it: per axis the config key and its size, or None where any size fits.
ExpectedShape = tuple[tuple[str, int] | None, ...]


@dataclass(frozen=True)
class TensorMatch:
    """A decoder-layer tensor the family's table explains."""

    rule: TensorRule
    name: str
    expert: int | None


@dataclass(frozen=True)
class Shard:
    file_name: str
    path: Path
    metadata: dict[str, str] | None
    tensors: tuple[LogicalTensor, ...]  # file order; a packed pair sits where its blocks were
    stored_names: frozenset[str]  # the names actually in the file (packed pairs as two names)


@dataclass
class Checkpoint:
    directory: Path
    config: dict[str, Any]
    model_type: str
    family: Family
    layout: Layout
    num_layers: int
    hidden_size: int
    shards: list[Shard]
    is_sharded: bool
    index_metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tensors: dict[str, LogicalTensor] = {
            tensor.name: tensor for shard in self.shards for tensor in shard.tensors
        }

    @property
    def text_config(self) -> dict[str, Any]:
        return text_config_of(self.config, self.family.text_config_key)

    @property
    def embedding_name(self) -> str:
        return f"{self.layout.model_prefix}embed_tokens.weight"

    @property
    def is_packed(self) -> bool:
        return any(isinstance(tensor, PackedTensor) for tensor in self.tensors.values())

    def ties_embeddings(self) -> bool:
        """Whether transformers will use the embedding as the output head (tied, maybe implicitly)."""
        if self.layout.lm_head not in self.tensors:
            return True
        flags = [self.config.get("tie_word_embeddings"), self.text_config.get("tie_word_embeddings")]
        declared = [flag for flag in flags if flag is not None]
        return any(declared) if declared else self.family.ties_embeddings_by_default

    def read(self, name: str) -> torch.Tensor:
        return load_tensor(self.tensors[name])

    @cached_property
    def layer_matches(self) -> dict[int, list[TensorMatch]]:
        """Every tensor a rule of the family matches, by decoder layer."""
        prefix = self.layout.model_prefix
        patterns = [(rule, layer_tensor_pattern(prefix, rule)) for rule in self.family.rules]
        matches: dict[int, list[TensorMatch]] = defaultdict(list)
        for name in self.tensors:
            for rule, pattern in patterns:
                found = pattern.fullmatch(name)
                if found:
                    expert = found.groupdict().get("expert")
                    match = TensorMatch(rule, name, int(expert) if expert is not None else None)
                    matches[int(found["layer"])].append(match)
        return matches


def load_tensor(tensor: LogicalTensor) -> torch.Tensor:
    """A private, writable copy of one tensor; packed MXFP4 tensors come dequantised."""
    if isinstance(tensor, PackedTensor):
        return mxfp4.dequantize(read_tensor(tensor.blocks), read_tensor(tensor.scales))
    return read_tensor(tensor)


def open_checkpoint(model: str | Path, flag: str = "model") -> Checkpoint:
    """Resolve `model` (a directory or a cached hub id) and read its config and shard headers."""
    directory = resolve_model_directory(model, flag=flag)
    config = read_config(directory)
    model_type = config.get("model_type")
    family = family_for(model_type)
    if family is None:
        raise UserError(
            f"{flag} {model}: model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    stored_by_file, is_sharded, index_metadata = _read_stored_tensors(directory)
    all_names = {tensor.name for header in stored_by_file.values() for tensor in header.tensors}
    layout = _detect_layout(family, all_names, directory)
    packed = _packed_tensors(family, layout, config, stored_by_file, directory)
    shards = [_shard(directory, file_name, headers, packed) for file_name, headers in stored_by_file.items()]
    text_config = text_config_of(config, family.text_config_key)
    num_layers, hidden_size = text_config.get("num_hidden_layers"), text_config.get("hidden_size")
    if not isinstance(num_layers, int) or not isinstance(hidden_size, int):
        raise UserError(f"{directory / 'config.json'}: needs integer num_hidden_layers and hidden_size")
    checkpoint = Checkpoint(
        directory,
        config,
        model_type,
        family,
        layout,
        num_layers,
        hidden_size,
        shards,
        is_sharded,
        index_metadata,
    )
    _check_shapes(checkpoint)
    return checkpoint


def _check_shapes(checkpoint: Checkpoint) -> None:
    """Every tensor whose shape follows from config.json must have it, before anything is edited or written.

    Above all the residual axis: a projection along a mislabelled or foreign tensor would edit the
    wrong numbers rather than fail.
    """
    expected = _expected_shapes(checkpoint)
    mismatches = [
        f"{shard.path}: tensor {tensor.name} has shape {list(tensor.shape)}, "
        f"but config.json implies {_shape_text(expected[tensor.name])}"
        for shard in checkpoint.shards
        for tensor in shard.tensors
        if tensor.name in expected and not _fits(tensor.shape, expected[tensor.name])
    ]
    if mismatches:
        others = f" (and {len(mismatches) - 1} more tensors)" if len(mismatches) > 1 else ""
        raise UserError(f"{mismatches[0]}{others}; the weights do not match the model's config")


def _expected_shapes(checkpoint: Checkpoint) -> dict[str, ExpectedShape]:
    """The residual axis of every tensor the table explains, the norm gains they pass through, and
    the embedding and output head ([vocab_size, hidden_size])."""
    hidden = ("hidden_size", checkpoint.hidden_size)
    prefix = checkpoint.layout.model_prefix
    expected: dict[str, ExpectedShape] = {}
    for layer, matches in checkpoint.layer_matches.items():
        for match in matches:
            axes: list[tuple[str, int] | None] = [None] * match.rule.axes
            axes[match.rule.residual_axis] = hidden
            expected[match.name] = tuple(axes)
            if match.rule.gain is not None:
                expected[f"{prefix}layers.{layer}.{match.rule.gain.norm}"] = (hidden,)
    vocab_size = checkpoint.text_config.get("vocab_size")
    vocab = ("vocab_size", vocab_size) if isinstance(vocab_size, int) else None
    for name in (checkpoint.embedding_name, checkpoint.layout.lm_head):
        expected[name] = (vocab, hidden)
    return expected


def _fits(shape: tuple[int, ...], expected: ExpectedShape) -> bool:
    return len(shape) == len(expected) and all(
        axis is None or size == axis[1] for size, axis in zip(shape, expected)
    )


def _shape_text(expected: ExpectedShape) -> str:
    return "[" + ", ".join("any" if axis is None else f"{axis[0]}={axis[1]}" for axis in expected) + "]"


def _read_stored_tensors(directory: Path) -> tuple[dict[str, ShardHeader], bool, dict[str, Any]]:
    index_path = directory / INDEX_NAME
    if index_path.is_file():
        weight_map, index_metadata = read_index(index_path)
        stored_by_file = {}
        for file_name in dict.fromkeys(weight_map.values()):
            if not (directory / file_name).is_file():
                raise UserError(f"{index_path}: lists {file_name}, which is missing")
            stored_by_file[file_name] = read_header(directory / file_name)
        for name, file_name in weight_map.items():
            if name not in {tensor.name for tensor in stored_by_file[file_name].tensors}:
                raise UserError(f"{index_path}: maps {name} to {file_name}, which does not contain it")
        return stored_by_file, True, index_metadata
    if (directory / SINGLE_FILE_NAME).is_file():
        return {SINGLE_FILE_NAME: read_header(directory / SINGLE_FILE_NAME)}, False, {}
    raise UserError(
        f"{directory}: no {INDEX_NAME} or {SINGLE_FILE_NAME} (only safetensors checkpoints are supported)"
    )


def _detect_layout(family: Family, names: set[str], directory: Path) -> Layout:
    for layout in family.layouts:
        if f"{layout.model_prefix}embed_tokens.weight" in names or any(
            name.startswith(f"{layout.model_prefix}layers.") for name in names
        ):
            return layout
    expected = " or ".join(f"'{layout.model_prefix}layers.N...'" for layout in family.layouts)
    raise UserError(f"{directory}: no tensors named like {expected} for model_type {family.name}")


def _packed_tensors(
    family: Family,
    layout: Layout,
    config: dict[str, Any],
    stored_by_file: dict[str, ShardHeader],
    directory: Path,
) -> dict[str, PackedTensor]:
    """Pair every MXFP4 `*_blocks` tensor the family knows with its `*_scales`."""
    if not family.packed_expert_tensors:
        return {}
    names = "|".join(re.escape(name) for name in family.packed_expert_tensors)
    pattern = re.compile(rf"{re.escape(layout.model_prefix)}layers\.\d+\.(?:{names}){mxfp4.BLOCKS_SUFFIX}")
    stored = {tensor.name: tensor for header in stored_by_file.values() for tensor in header.tensors}
    packed = {}
    for name, tensor in stored.items():
        if not pattern.fullmatch(name):
            continue
        base = name.removesuffix(mxfp4.BLOCKS_SUFFIX)
        scales = stored.get(base + mxfp4.SCALES_SUFFIX)
        if scales is None or len(tensor.shape) != 4 or tuple(tensor.shape[:-1]) != tuple(scales.shape):
            raise UserError(
                f"{directory}: {name} has no matching {base}{mxfp4.SCALES_SUFFIX} of shape {tensor.shape[:-1]}"
            )
        packed[base] = PackedTensor(base, tensor, scales)
    quantization = config.get("quantization_config") or {}
    if packed and quantization.get("quant_method") != "mxfp4":
        raise UserError(
            f"{directory / 'config.json'}: tensors are MXFP4-packed but quantization_config is not mxfp4"
        )
    return packed


def _shard(directory: Path, file_name: str, header: ShardHeader, packed: dict[str, PackedTensor]) -> Shard:
    packed_parts = {part.name: base for base, pair in packed.items() for part in (pair.blocks, pair.scales)}
    tensors: list[LogicalTensor] = []
    for tensor in header.tensors:
        base = packed_parts.get(tensor.name)
        if base is None:
            tensors.append(tensor)
        elif tensor.name == packed[base].blocks.name:
            tensors.append(packed[base])
    return Shard(
        file_name,
        directory / file_name,
        header.metadata,
        tuple(tensors),
        frozenset(tensor.name for tensor in header.tensors),
    )
