"""What was done, written beside the weights: the resolved plan (ablation_plan.yml, with the list of
every file the run wrote, so that --overwrite replaces only an output it fully accounts for), the
model card, and the dry-run's edit table.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from lib.ablate.checkpoint import Checkpoint
from lib.ablate.plan import Plan, format_layers
from lib.ablate.resolution import Resolution, TensorEdit
from lib.core.prompts import file_sha256

PLAN_FILE_NAME = "ablation_plan.yml"


MODEL_CARD_NAME = "README.md"


TOOL_NAME = "sharded_ablate.py"


# The plan copy's list of every file the run wrote: --overwrite replaces only an output it fully accounts for.
OUTPUT_FILES_KEY = "output_files"


def resolved_plan_document(
    plan: Plan, checkpoint: Checkpoint, resolution: Resolution, skipped: list[Path]
) -> dict:
    """What was done, explicitly: written beside the weights as ablation_plan.yml."""
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tool": TOOL_NAME,
        "plan_file": str(plan.source),
        "model": {
            "path": str(checkpoint.directory),
            "given_as": plan.model,
            "model_type": checkpoint.model_type,
        },
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


def write_plan_and_card(
    plan: Plan, checkpoint: Checkpoint, resolution: Resolution, skipped: list[Path], directory: Path
) -> None:
    """Written last: the plan copy lists every file in `directory`, itself and the model card included."""
    document = resolved_plan_document(plan, checkpoint, resolution, skipped)
    document[OUTPUT_FILES_KEY] = sorted([*output_entries(directory), PLAN_FILE_NAME, MODEL_CARD_NAME])
    (directory / PLAN_FILE_NAME).write_text(
        yaml.dump(document, Dumper=_ReadableDumper, sort_keys=False, allow_unicode=True, width=120)
    )
    (directory / MODEL_CARD_NAME).write_text(
        model_card(document, resolution, checkpoint.directory / MODEL_CARD_NAME)
    )


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
        + ", ".join(f"{count} {name}" for name, count in sorted(components.items()))
        + ")",
        f"- Global scale: {document['global_scale']:g}",
    ]
    if document["untied_embeddings"]:
        lines.append(
            "- The embedding was edited while tied to the output head: an untouched `lm_head` was written "
            "and `tie_word_embeddings` set to false."
        )
    if document["dequantized_mxfp4"]:
        lines.append(
            "- The MXFP4 expert tensors were dequantised to bfloat16 (exactly) and `quantization_config` removed."
        )
    if document["skipped_files"]:
        lines.append(
            "- Not copied (weights in another format, which would be unedited): "
            + ", ".join(f"`{name}`" for name in document["skipped_files"])
        )
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
        (
            edit.tensor,
            edit.rule,
            "-" if edit.layer is None else str(edit.layer),
            edit.source,
            f"{edit.scale:g}",
            edit.direction_label + (f" through gain of {edit.gain_label}" if edit.gain_label else ""),
        )
        for edit in edits
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1] for row in rows
    )
