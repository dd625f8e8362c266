"""Write the ablated model: the output's shard layout, the streaming engine and the files around it.

The output mirrors the input: the same shard files, tensors in the same order, the same shard
metadata, an index when the input has one. A shard without edits is copied whole (or hard-linked);
a shard with edits is written tensor by tensor: untouched tensors are copied byte for byte inside
the kernel, edited ones are loaded alone, projected in place and written out. Two changes of layout
are forced by the plan and said so in the model card: an edited embedding that was tied to the
output head gets an untouched `lm_head` copy beside it (and the config unties them), and MXFP4
expert tensors are written dequantised (bfloat16, lossless) with `quantization_config` dropped.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from lib.checkpoint import Checkpoint, LogicalTensor, Shard, load_tensor
from lib.model_files import INDEX_NAME, text_config_of
from lib.plan import Plan, format_layers
from lib.projection import project_out
from lib.prompts import file_sha256
from lib.resolution import Resolution, TensorEdit
from lib.safetensors_stream import (
    ELEMENT_SIZES,
    BackgroundWriter,
    HeaderEntry,
    StoredTensor,
    encode_header,
    queue_file_copy,
    queue_shard,
)

PLAN_FILE_NAME = "ablation_plan.yml"
MODEL_CARD_NAME = "README.md"
TOOL_NAME = "sharded_ablate.py"
# The plan copy's list of every file the run wrote: --overwrite replaces only an output it fully accounts for.
OUTPUT_FILES_KEY = "output_files"
CONFIG_NAME = "config.json"
# Files and folders that hold weights in other formats: copying them would ship unedited weights.
_OTHER_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
_NON_WEIGHT_BIN_FILES = ("training_args.bin",)
_SKIPPED_DIRECTORIES = (".cache", ".git")


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
        return (all(tensor.is_byte_copy for tensor in self.tensors)
                and {tensor.name for tensor in self.tensors} == self.input.stored_names)

    @property
    def nbytes(self) -> int:
        if self.is_unchanged:
            return self.input.path.stat().st_size
        return len(encode_header([tensor.header_entry for tensor in self.tensors], self.input.metadata)) + sum(
            tensor.source.nbytes for tensor in self.tensors)


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
    shards: list[OutputShard], directory: Path, link: bool, device: torch.device, on_bytes: Callable[[int], None]
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
    shards: list[OutputShard], directory: Path, link: bool, device: torch.device, on_bytes: Callable[[int], None]
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


def _write_edited_shard(writer: BackgroundWriter, shard: OutputShard, target: Path, device: torch.device) -> None:
    queued = queue_shard(writer, target, [tensor.header_entry for tensor in shard.tensors], shard.input.metadata)
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
    index = {"metadata": {**checkpoint.index_metadata, "total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def output_config(checkpoint: Checkpoint, resolution: Resolution) -> dict[str, Any] | None:
    """The config to write when the output's layout differs from the input's; None to copy it as is."""
    if not resolution.untie_embeddings and not checkpoint.is_packed:
        return None
    config = json.loads(json.dumps(checkpoint.config))
    if resolution.untie_embeddings:
        config["tie_word_embeddings"] = False
        text_config_of(config, checkpoint.family.text_config_key)["tie_word_embeddings"] = False
    if checkpoint.is_packed:
        config.pop("quantization_config", None)
    return config


def non_weight_files(checkpoint: Checkpoint) -> tuple[list[Path], list[Path]]:
    """(files and folders to copy, those skipped because they hold weights in another format)."""
    weight_names = {shard.file_name for shard in checkpoint.shards} | {INDEX_NAME}
    copied, skipped = [], []
    for path in sorted(checkpoint.directory.iterdir()):
        if path.name in weight_names or path.name in _SKIPPED_DIRECTORIES:
            continue
        holds_weights = _holds_weights(path) if path.is_dir() else _is_weight_file(path)
        (skipped if holds_weights else copied).append(path)
    return copied, skipped


def _is_weight_file(path: Path) -> bool:
    return path.suffix in _OTHER_WEIGHT_SUFFIXES and path.name not in _NON_WEIGHT_BIN_FILES


def _holds_weights(directory: Path) -> bool:
    return any(_is_weight_file(path) for path in directory.rglob("*") if path.is_file())


def copy_non_weight_files(files: list[Path], directory: Path, config: dict[str, Any] | None) -> None:
    for path in files:
        target = directory / path.name
        if path.name == CONFIG_NAME and config is not None:
            target.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        elif path.name == MODEL_CARD_NAME:
            continue  # merged into the new model card
        elif path.is_dir():
            shutil.copytree(path, target)
        else:
            shutil.copyfile(path, target)


def non_weight_bytes(files: list[Path]) -> int:
    return sum(sum(item.stat().st_size for item in path.rglob("*") if item.is_file()) if path.is_dir()
               else path.stat().st_size for path in files)


def resolved_plan_document(plan: Plan, checkpoint: Checkpoint, resolution: Resolution, skipped: list[Path]) -> dict:
    """What was done, explicitly: written beside the weights as ablation_plan.yml."""
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tool": TOOL_NAME,
        "plan_file": str(plan.source),
        "model": {"path": str(checkpoint.directory), "given_as": plan.model, "model_type": checkpoint.model_type},
        "measurements": {"path": str(plan.measurements), "sha256": file_sha256(plan.measurements)},
        "global_scale": plan.global_scale,
        "untied_embeddings": resolution.untie_embeddings,
        "dequantized_mxfp4": checkpoint.is_packed,
        "skipped_files": [path.name for path in skipped],
        "edits": [edit_record(edit) for edit in resolution.edits],
        "plan": plan.text,
    }


def edit_record(edit: TensorEdit) -> dict[str, Any]:
    return {
        "tensor": edit.tensor,
        "rule": edit.rule,
        "component": edit.component,
        "layer": edit.layer,
        "source": edit.source,
        "direction": edit.direction_label,
        "gain": edit.gain_label,
        "scale": edit.scale,
    }


def write_plan_and_card(plan: Plan, checkpoint: Checkpoint, resolution: Resolution, skipped: list[Path],
                        directory: Path) -> None:
    """Written last: the plan copy lists every file in `directory`, itself and the model card included."""
    document = resolved_plan_document(plan, checkpoint, resolution, skipped)
    document[OUTPUT_FILES_KEY] = sorted([*output_entries(directory), PLAN_FILE_NAME, MODEL_CARD_NAME])
    (directory / PLAN_FILE_NAME).write_text(yaml.dump(document, Dumper=_ReadableDumper, sort_keys=False,
                                                      allow_unicode=True, width=120))
    (directory / MODEL_CARD_NAME).write_text(model_card(document, resolution, checkpoint.directory / MODEL_CARD_NAME))


def output_entries(directory: Path) -> list[str]:
    """Every entry under `directory` other than a folder (files, links), as relative POSIX paths."""
    entries = []
    for entry in os.scandir(directory):
        if entry.is_dir(follow_symlinks=False):
            entries += [f"{entry.name}/{inner}" for inner in output_entries(Path(entry.path))]
        else:
            entries.append(entry.name)
    return entries


def files_written_by_this_tool(directory: Path) -> frozenset[str] | None:
    """The files a previous run recorded writing into `directory`; None unless its plan copy is ours."""
    try:
        document = yaml.safe_load((directory / PLAN_FILE_NAME).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if not isinstance(document, dict) or document.get("tool") != TOOL_NAME:
        return None
    files = document.get(OUTPUT_FILES_KEY)
    if not isinstance(files, list) or not all(isinstance(name, str) for name in files):
        return None
    return frozenset(files)


class _ReadableDumper(yaml.SafeDumper):
    """Safe YAML that writes multi-line strings (the plan as written) as literal blocks."""


def _represent_text(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


_ReadableDumper.add_representer(str, _represent_text)


def model_card(document: dict[str, Any], resolution: Resolution, original_card: Path) -> str:
    original = original_card.read_text() if original_card.is_file() else ""
    front_matter, body = _split_front_matter(original)
    components: dict[str, int] = {}
    for edit in resolution.edits:
        components[edit.component] = components.get(edit.component, 0) + 1
    layers = sorted({edit.layer for edit in resolution.edits if edit.layer is not None})
    lines = [
        front_matter,
        f"# {Path(document['model']['given_as']).name.rstrip('/') or document['model']['given_as']} — refusal direction ablated",
        "",
        f"This model is `{document['model']['given_as']}` ({document['model']['model_type']}) with a refusal direction "
        "projected out of its weights by `sharded_ablate.py`. Every tensor not listed in "
        f"`{PLAN_FILE_NAME}` is bit-identical to the source.",
        "",
        f"- Measurements: `{document['measurements']['path']}` (sha256 `{document['measurements']['sha256']}`)",
        f"- Layers edited: {format_layers(layers) if layers else 'none'}",
        f"- Tensors edited: {len(resolution.edits)} ("
        + ", ".join(f"{count} {name}" for name, count in sorted(components.items())) + ")",
        f"- Global scale: {document['global_scale']:g}",
    ]
    if document["untied_embeddings"]:
        lines.append("- The embedding was edited while tied to the output head: an untouched `lm_head` was written "
                     "and `tie_word_embeddings` set to false.")
    if document["dequantized_mxfp4"]:
        lines.append("- The MXFP4 expert tensors were dequantised to bfloat16 (exactly) and `quantization_config` removed.")
    if document["skipped_files"]:
        lines.append("- Not copied (weights in another format, which would be unedited): "
                     + ", ".join(f"`{name}`" for name in document["skipped_files"]))
    lines += ["", f"The full edit list and the plan as written are in `{PLAN_FILE_NAME}`.", ""]
    if body.strip():
        lines += ["## Original model card", "", body.strip(), ""]
    return "\n".join(line for line in lines if line is not None).lstrip("\n")


def _split_front_matter(card: str) -> tuple[str, str]:
    if card.startswith("---\n"):
        end = card.find("\n---", 4)
        if end != -1:
            cut = card.find("\n", end + 4)
            cut = len(card) if cut == -1 else cut + 1
            return card[:cut], card[cut:]
    return "", card


def edit_table(edits: tuple[TensorEdit, ...]) -> str:
    """The dry-run listing: one line per tensor edit, in aligned columns."""
    header = ("TENSOR", "RULE", "LAYER", "SOURCE", "SCALE", "DIRECTION")
    rows = [header] + [
        (edit.tensor, edit.rule, "-" if edit.layer is None else str(edit.layer), edit.source, f"{edit.scale:g}",
         edit.direction_label + (f" through gain of {edit.gain_label}" if edit.gain_label else ""))
        for edit in edits
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(len(header) - 1)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1] for row in rows)

