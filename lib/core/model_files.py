"""Find a model's files on disk: a local directory, or a hub id already in the local cache.

Nothing here touches the network: a hub id that is not cached is an error, not a download.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

from lib.core.errors import UserError

CONFIG_NAME = "config.json"
# Where multimodal wrappers keep their language model's settings inside config.json.
TEXT_CONFIG_KEY = "text_config"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_FILE_NAME = "model.safetensors"


def resolve_model_directory(name_or_path: str | Path, flag: str = "--model") -> Path:
    """Return the directory holding `config.json` for a local path or a cached hub id."""
    candidate = Path(name_or_path).expanduser()
    if candidate.is_dir():
        if not (candidate / CONFIG_NAME).is_file():
            raise UserError(f"{flag} {name_or_path}: directory has no config.json (not a Hugging Face model)")
        read_config(candidate)  # a broken config.json is named here, before a loader stumbles over it
        return candidate
    if candidate.exists():
        raise UserError(f"{flag} {name_or_path}: is a file, expected a model directory or a cached hub id")
    looks_like_hub_id = str(name_or_path).count("/") == 1 and not str(name_or_path).startswith(
        (".", "/", "~")
    )
    if not looks_like_hub_id:
        raise UserError(f"{flag} {name_or_path}: model directory not found")
    try:
        # HF_HUB_CACHE is read at call time (huggingface_hub reads it once at import).
        cache_directory = os.environ.get("HF_HUB_CACHE") or None
        snapshot = Path(
            snapshot_download(str(name_or_path), local_files_only=True, cache_dir=cache_directory)
        )
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        raise UserError(
            f"{flag} {name_or_path}: neither a local directory nor a hub id in the local cache "
            "(download it first, e.g. `hf download ORG/NAME`, or pass a directory)"
        ) from None
    if not (snapshot / CONFIG_NAME).is_file():
        raise UserError(f"{flag} {name_or_path}: cached snapshot {snapshot} has no config.json")
    read_config(snapshot)
    return snapshot


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object stored in `path`; anything else is a UserError naming the file and the problem."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        position = f"line {error.lineno} column {error.colno}"
        raise UserError(f"{path}: invalid JSON ({error.msg} at {position})") from None
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text (byte {error.start})") from None
    if not isinstance(document, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(document).__name__}")
    return document


def read_config(model_directory: Path) -> dict[str, Any]:
    return read_json_object(model_directory / CONFIG_NAME)


def text_config_of(config: dict[str, Any], key: str | None = TEXT_CONFIG_KEY) -> dict[str, Any]:
    """The language model's settings in a config.json: the `key` section of a multimodal wrapper, the
    config itself for a text-only model (the dict counterpart of lib.core.loading.text_config)."""
    section = config.get(key) if key else None
    return section if isinstance(section, dict) else config


def read_index(index_path: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """A sharded checkpoint's index: its `weight_map` (tensor name -> shard file name) and its `metadata`."""
    index = read_json_object(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
        raise UserError(f"{index_path}: 'weight_map' must be an object mapping tensor names to file names")
    metadata = index.get("metadata", {})
    return weight_map, metadata if isinstance(metadata, dict) else {}


def weight_files(model_directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint, sharded (index) or single-file, in index order."""
    index_path = model_directory / INDEX_NAME
    if index_path.is_file():
        weight_map, _ = read_index(index_path)
        files = [model_directory / name for name in dict.fromkeys(weight_map.values())]
        missing = next((path for path in files if not path.is_file()), None)
        if missing is not None:
            raise UserError(f"{index_path}: lists {missing.name}, which is missing")
        return files
    single = model_directory / SINGLE_FILE_NAME
    if single.is_file():
        return [single]
    raise UserError(
        f"{model_directory}: no {INDEX_NAME} or {SINGLE_FILE_NAME} (only safetensors checkpoints are supported)"
    )


def checkpoint_bytes(model_directory: Path) -> int:
    """Bytes of weights on disk (following hub-cache symlinks)."""
    return sum(path.stat().st_size for path in weight_files(model_directory))
