"""Write the ablated model's weights: the output's shard layout and the streaming engine.

The output mirrors the input: the same shard files, tensors in the same order, the same shard
metadata, an index when the input has one. A shard without edits is copied whole (or hard-linked);
a shard with edits is written tensor by tensor: untouched tensors are copied byte for byte inside
the kernel, edited ones are loaded alone, projected in place and written out. An edited embedding
that was tied to the output head gets an untouched `lm_head` copy beside it, and MXFP4 expert
tensors are written dequantised (bfloat16, lossless).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lib.ablate.checkpoint import Checkpoint, LogicalTensor, Shard, load_tensor
from lib.ablate.projection import project_out
from lib.ablate.resolution import Resolution, TensorEdit
from lib.ablate.safetensors_stream import (
    ELEMENT_SIZES,
    BackgroundWriter,
    HeaderEntry,
    StoredTensor,
    encode_header,
    queue_file_copy,
    queue_shard,
)
from lib.core.model_files import INDEX_NAME


@dataclass(frozen=True)
class OutputTensor:
    name: str
    source: LogicalTensor
    edit: TensorEdit | None

    @property
    def is_byte_copy(self) -> bool:
        return self.edit is None and isinstance(self.source, StoredTensor)

    @property
    def header_entry(self) -> HeaderEntry:
        return HeaderEntry(self.name, self.source.dtype, tuple(self.source.shape), self.source.nbytes)


@dataclass(frozen=True)
class OutputShard:
    file_name: str
    input: Shard
    tensors: tuple[OutputTensor, ...]

    @property
    def is_unchanged(self) -> bool:
        """Byte-identical to the input file: copy or link it whole."""
        return (
            all(tensor.is_byte_copy for tensor in self.tensors)
            and {tensor.name for tensor in self.tensors} == self.input.stored_names
        )

    @property
    def nbytes(self) -> int:
        if self.is_unchanged:
            return self.input.path.stat().st_size
        return len(
            encode_header([tensor.header_entry for tensor in self.tensors], self.input.metadata)
        ) + sum(tensor.source.nbytes for tensor in self.tensors)


def plan_output(checkpoint: Checkpoint, resolution: Resolution) -> list[OutputShard]:
    """The output shards: the input's, with edits attached and the forced layout changes applied."""
    edits = {edit.tensor: edit for edit in resolution.edits}
    add_lm_head = resolution.untie_embeddings and checkpoint.layout.lm_head not in checkpoint.tensors
    shards = []
    for shard in checkpoint.shards:
        tensors = []
        for tensor in shard.tensors:
            tensors.append(OutputTensor(tensor.name, tensor, edits.get(tensor.name)))
            if add_lm_head and tensor.name == checkpoint.embedding_name:
                # The head keeps the original embedding bytes; the embedding itself is edited.
                tensors.append(OutputTensor(checkpoint.layout.lm_head, tensor, None))
        # Largest elements first keeps every tensor aligned; stable, so a reference-ordered shard keeps its order.
        tensors.sort(key=lambda output: -ELEMENT_SIZES[output.source.dtype])
        shards.append(OutputShard(shard.file_name, shard, tuple(tensors)))
    return shards


def write_weights(
    shards: list[OutputShard],
    directory: Path,
    link: bool,
    device: torch.device,
    on_bytes: Callable[[int], None],
) -> None:
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # The math is memory-bound and blocked to stay in cache, so one thread does it at memory speed;
        # more OpenMP threads would spin on every small block and starve the background writer thread.
        torch.set_num_threads(1)
    try:
        _write_shards(shards, directory, link, device, on_bytes)
    finally:
        torch.set_num_threads(threads)


def _write_shards(
    shards: list[OutputShard],
    directory: Path,
    link: bool,
    device: torch.device,
    on_bytes: Callable[[int], None],
) -> None:
    with BackgroundWriter(on_bytes) as writer:
        for shard in shards:
            target = directory / shard.file_name
            if shard.is_unchanged and link:
                os.link(os.path.realpath(shard.input.path), target)
                on_bytes(shard.nbytes)
            elif shard.is_unchanged:
                queue_file_copy(writer, shard.input.path, target)
            else:
                _write_edited_shard(writer, shard, target, device)


def _write_edited_shard(
    writer: BackgroundWriter, shard: OutputShard, target: Path, device: torch.device
) -> None:
    queued = queue_shard(
        writer, target, [tensor.header_entry for tensor in shard.tensors], shard.input.metadata
    )
    for tensor in shard.tensors:
        if tensor.is_byte_copy:
            queued.copy_range(tensor.source.path, tensor.source.begin, tensor.source.nbytes)
            continue
        values = load_tensor(tensor.source)
        if tensor.edit is not None:
            edit = tensor.edit
            project_out(values, edit.direction, edit.scale, edit.residual_axis, edit.norm_preserve, device)
        queued.write_tensor(values)
    queued.close()


def write_index(checkpoint: Checkpoint, shards: list[OutputShard], directory: Path) -> None:
    if not checkpoint.is_sharded:
        return
    weight_map = {tensor.name: shard.file_name for shard in shards for tensor in shard.tensors}
    total = sum(tensor.source.nbytes for shard in shards for tensor in shard.tensors)
    index = {
        "metadata": {**checkpoint.index_metadata, "total_size": total},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
