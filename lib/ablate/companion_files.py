"""The files around the weights: config.json (rewritten where the layout changed: untied embeddings,
dequantised MXFP4 experts), tokenizer, chat template and every other non-weight file, copied; files
that hold weights in another format are skipped, never shipped unedited.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from lib.ablate.checkpoint import Checkpoint
from lib.ablate.record import MODEL_CARD_NAME
from lib.ablate.resolution import Resolution
from lib.core.model_files import INDEX_NAME, text_config_of

CONFIG_NAME = "config.json"


# Files and folders that hold weights in other formats: copying them would ship unedited weights.
_OTHER_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")


_NON_WEIGHT_BIN_FILES = ("training_args.bin",)


_SKIPPED_DIRECTORIES = (".cache", ".git")


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
    return sum(
        sum(item.stat().st_size for item in path.rglob("*") if item.is_file())
        if path.is_dir()
        else path.stat().st_size
        for path in files
    )
