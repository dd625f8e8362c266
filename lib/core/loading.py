"""Load a model and its tokenizer for inference, the same way in every stage.

Shared flags (`add_model_loading_arguments`, defined in lib/core/cli_options.py so that parsers build
without torch): `--dtype`, `--device-map`, `--flash-attn` and a bitsandbytes quantisation flag whose
names the caller chooses (`--quant` everywhere; measure.py also keeps `--quant-measure/-q`).

Before any weight is read, the memory the weights need is estimated from the config (built on
the meta device, so exact per parameter) and compared with what the chosen devices have free;
when it cannot fit the run stops with a message suggesting quantisation or another device map.

Checkpoints that are already quantised (MXFP4 GPT-OSS, block-FP8, bitsandbytes) are loaded with
their own `quantization_config`; transformers dequantises MXFP4/FP8 where no kernel exists (CPU).
Multimodal wrappers load through their image-text class; `decoder_layers` finds the text
decoder stack wherever the wrapper keeps it.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoTokenizer,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING,
)

from lib.ablate.safetensors_stream import read_header

# The flags are defined without torch (parsers build before it loads); re-exported from here.
from lib.core.cli_options import (  # noqa: F401
    DEVICE_MAPS,
    DTYPE_NAMES,
    QUANTIZATIONS,
    add_model_loading_arguments,
)
from lib.core.errors import UserError, warn
from lib.core.model_files import (
    INDEX_NAME,
    SINGLE_FILE_NAME,
    checkpoint_bytes,
    read_config,
    weight_files,
)

# The `--dtype` choices as torch dtypes; "auto" (None): the checkpoint's own dtype (config.json),
# float32 when it names none.
DTYPES: dict[str, torch.dtype | None] = {
    name: None if name == "auto" else getattr(torch, name) for name in DTYPE_NAMES
}

# Bytes per weight of a bitsandbytes-quantised nn.Linear: 4-bit NF4 with double quantisation
# keeps an 8-bit absmax per 64 weights (plus a tiny second level); 8-bit keeps a scale per row.
QUANTIZED_BYTES_PER_WEIGHT = {"4bit": 0.5 + 1 / 64 + 4 / (64 * 256), "8bit": 1.0}
# Free memory kept beyond the weights for activations, buffers and allocator slack.
MEMORY_HEADROOM_FRACTION = 0.10
GIB = 1 << 30

# Where wrappers keep the text decoder stack, most common first (architecture knowledge as data).
DECODER_LAYER_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen, Gemma, GPT-OSS, DeepSeek, Mixtral, ...
    "model.language_model.layers",  # multimodal wrappers in transformers 5 (Gemma 3, Mistral 3, ...)
    "language_model.model.layers",  # older multimodal layout
    "model.language_model.model.layers",
    "language_model.layers",
    "model.text_model.layers",
    "transformer.h",  # GPT-2, Falcon, Bloom style
    "gpt_neox.layers",
    "model.decoder.layers",  # OPT
)


@dataclass(frozen=True)
class ModelLoadOptions:
    """How to load a model; built from the shared flags with `ModelLoadOptions.from_arguments`."""

    dtype: str = "auto"
    device_map: str = "auto"
    quantization: str | None = None  # "4bit", "8bit" (bitsandbytes) or None
    flash_attention: bool = False
    quantization_flag: str = "--quant"  # the flag name used in messages

    @classmethod
    def from_arguments(cls, arguments: argparse.Namespace) -> ModelLoadOptions:
        return cls(
            dtype=arguments.dtype,
            device_map=arguments.device_map,
            quantization=arguments.quantization,
            flash_attention=arguments.flash_attn,
            quantization_flag=arguments.quantization_flag,
        )


def load_tokenizer(model_directory: Path, label: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer; `label` (e.g. "--model NAME") starts any error message."""
    try:
        return AutoTokenizer.from_pretrained(model_directory)
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"{label}: cannot load the tokenizer ({_first_line(error)})") from None


def load_config(model_directory: Path, label: str) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(model_directory)
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"{label}: cannot read config.json ({_first_line(error)})") from None


def text_config(config: PretrainedConfig) -> PretrainedConfig:
    """The language model's config (the config itself for text-only models); lib.core.model_files.text_config_of
    does the same for a config.json read as a dict."""
    return config.get_text_config()


def load_model(model_directory: Path, options: ModelLoadOptions, label: str) -> PreTrainedModel:
    """Load the model for inference after checking that its weights fit the chosen devices."""
    config = load_config(model_directory, label)
    model_class = _model_class(config, label)
    device_map = _device_map(options)
    dtype = resolve_dtype(config, options.dtype)
    checkpoint_method = checkpoint_quantization_method(config)
    quantization = options.quantization
    if quantization and checkpoint_method:
        warn(
            f"{label}: the checkpoint is already quantised ({checkpoint_method}); "
            f"ignoring {options.quantization_flag} {quantization}"
        )
        quantization = None
    check_weight_files(model_directory)
    check_memory(model_directory, config, dtype, quantization, checkpoint_method, options, label)
    keyword_arguments: dict[str, Any] = {"dtype": dtype, "device_map": device_map}
    if quantization:
        may_spill_to_cpu = torch.cuda.is_available() and device_map in ("auto", "balanced", "sequential")
        keyword_arguments["quantization_config"] = bitsandbytes_config(quantization, dtype, may_spill_to_cpu)
        _show_bitsandbytes_cast_warning_once()
    attention = _attention_implementation(options, device_map)
    try:
        model = _from_pretrained(model_class, model_directory, keyword_arguments, attention, label)
    except (ValueError, ImportError) as error:
        if attention is None:
            raise
        warn(f"--flash-attn: not usable with this model ({_first_line(error)}); using the default attention")
        model = _from_pretrained(model_class, model_directory, keyword_arguments, None, label)
    model.eval()
    return model


def _from_pretrained(
    model_class: type,
    model_directory: Path,
    keyword_arguments: dict[str, Any],
    attention: str | None,
    label: str,
) -> PreTrainedModel:
    if attention is not None:
        keyword_arguments = {**keyword_arguments, "attn_implementation": attention}
    try:
        return model_class.from_pretrained(model_directory, **keyword_arguments)
    except (OSError, SafetensorError) as error:
        raise UserError(f"{label}: cannot load the weights ({_first_line(error)})") from None


def check_weight_files(model_directory: Path) -> None:
    """Read the index and every shard's header before transformers does: its errors about a broken index
    or a corrupt shard (`SafetensorError: Error while deserializing header: ...`) do not name the file."""
    if not any((model_directory / name).is_file() for name in (INDEX_NAME, SINGLE_FILE_NAME)):
        return  # weights in another format (PyTorch .bin): transformers checks those itself
    for path in weight_files(model_directory):
        read_header(path)


def _model_class(config: PretrainedConfig, label: str) -> type:
    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        return AutoModelForCausalLM
    if type(config) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING:
        return AutoModelForImageTextToText
    raise UserError(
        f"{label}: model type '{config.model_type}' is not a causal language model known to transformers"
    )


def _device_map(options: ModelLoadOptions) -> str:
    if options.device_map == "cuda" and not torch.cuda.is_available():
        raise UserError("--device-map cuda: no CUDA device is available; use cpu or auto")
    return options.device_map


def resolve_dtype(config: PretrainedConfig, dtype_name: str) -> torch.dtype:
    """The dtype the weights are loaded in: the named one, or for `auto` the checkpoint's own."""
    if dtype_name not in DTYPES:
        raise UserError(f"--dtype {dtype_name}: unknown; allowed: {', '.join(DTYPES)}")
    chosen = DTYPES[dtype_name]
    if chosen is not None:
        return chosen
    for candidate in (getattr(config, "dtype", None), getattr(text_config(config), "dtype", None)):
        if isinstance(candidate, torch.dtype):
            return candidate
        if isinstance(candidate, str) and isinstance(getattr(torch, candidate, None), torch.dtype):
            return getattr(torch, candidate)
    return torch.float32


def checkpoint_quantization_method(config: PretrainedConfig) -> str | None:
    """`quant_method` of a checkpoint that ships quantised (mxfp4, fp8, bitsandbytes, ...), else None."""
    quantization_config = getattr(config, "quantization_config", None)
    if quantization_config is None:
        return None
    if isinstance(quantization_config, dict):
        method = quantization_config.get("quant_method")
    else:
        method = getattr(quantization_config, "quant_method", None)
    method = getattr(method, "value", method)  # transformers stores an enum on config objects
    return str(method) if method else "unknown"


def bitsandbytes_config(
    quantization: str, dtype: torch.dtype, may_spill_to_cpu: bool = False
) -> BitsAndBytesConfig:
    """bitsandbytes settings; `may_spill_to_cpu` lets layers that do not fit the GPUs run unquantised
    on the CPU instead of failing to load (only meaningful with a GPU: on a CPU-only machine the
    same setting would leave every layer unquantised)."""
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_enable_fp32_cpu_offload=may_spill_to_cpu,
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=may_spill_to_cpu)
    raise UserError(f"quantisation {quantization!r}: unknown; allowed: {', '.join(QUANTIZATIONS)}")


def quantization_description(model: PreTrainedModel) -> str | None:
    """How the loaded weights are quantised, for records: 'bitsandbytes 4bit nf4', 'mxfp4', ... or None.

    transformers drops `quantization_config` from a model it dequantised while loading (MXFP4 or
    FP8 on CPU), so the checkpoint's own config.json is consulted for those.
    """
    live = getattr(model.config, "quantization_config", None)
    if live is not None:
        settings = live if isinstance(live, dict) else live.to_dict()
        if settings.get("load_in_4bit"):
            return f"bitsandbytes 4bit {settings.get('bnb_4bit_quant_type', '')}".strip()
        if settings.get("load_in_8bit"):
            return "bitsandbytes 8bit"
        return checkpoint_quantization_method(model.config)
    stored_config = Path(str(model.name_or_path)) / "config.json"
    if stored_config.is_file():
        method = read_config(stored_config.parent).get("quantization_config", {}).get("quant_method")
        if method:
            return f"{method} (dequantized while loading)"
    return None


def _attention_implementation(options: ModelLoadOptions, device_map: str) -> str | None:
    if not options.flash_attention:
        return None
    if device_map == "cpu" or not torch.cuda.is_available():
        warn("--flash-attn: FlashAttention needs a CUDA device; using the default attention")
        return None
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        warn("--flash-attn: the flash-attn package is not installed; using the default attention")
        return None
    return "flash_attention_2"


def _show_bitsandbytes_cast_warning_once() -> None:
    """bitsandbytes logs the same 8-bit input-cast notice on every matmul; keep the first one."""

    class OncePerMessage(logging.Filter):
        def __init__(self) -> None:
            super().__init__()
            self.seen: set[str] = set()

        def filter(self, record: logging.LogRecord) -> bool:
            message = record.getMessage()
            if message in self.seen:
                return False
            self.seen.add(message)
            return True

    bitsandbytes_logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(existing, OncePerMessage) for existing in bitsandbytes_logger.filters):
        bitsandbytes_logger.addFilter(OncePerMessage())


# ---- memory estimate -------------------------------------------------------------------------


def estimate_weight_bytes(config: PretrainedConfig, dtype: torch.dtype, quantization: str | None) -> int:
    """Bytes the loaded weights take: exact per parameter, from the model built on the meta device.

    With bitsandbytes only `nn.Linear` weights are quantised (not embeddings, the output head,
    norms, or the fused 3-D expert tensors of MoE models in transformers 5).
    """
    with torch.device("meta"):
        model = _model_class(config, "--model").from_config(config, dtype=dtype)
    output_head = model.get_output_embeddings()
    element_size = torch.tensor([], dtype=dtype).element_size()
    total = 0.0
    counted: set[int] = set()  # tied weights (embedding = output head) are one tensor
    for module in model.modules():
        quantizable = quantization is not None and isinstance(module, nn.Linear) and module is not output_head
        for name, parameter in module.named_parameters(recurse=False):
            if id(parameter) in counted:
                continue
            counted.add(id(parameter))
            if quantizable and name == "weight":
                total += parameter.numel() * QUANTIZED_BYTES_PER_WEIGHT[quantization]
            else:
                total += parameter.numel() * element_size
    total += sum(buffer.numel() * buffer.element_size() for buffer in model.buffers())
    return int(total)


@dataclass(frozen=True)
class DeviceMemory:
    free_bytes: int
    description: str  # e.g. "CPU RAM", "GPU 0", for messages
    includes_gpu: bool


def available_memory(device_map: str) -> DeviceMemory:
    """Free memory on the devices `device_map` may use."""
    cpu_free = cpu_available_bytes()
    if device_map == "cpu" or not torch.cuda.is_available():
        return DeviceMemory(cpu_free, "CPU RAM", includes_gpu=False)
    gpu_free = [torch.cuda.mem_get_info(index)[0] for index in range(torch.cuda.device_count())]
    if device_map == "cuda":
        current = torch.cuda.current_device()
        return DeviceMemory(gpu_free[current], f"GPU {current}", includes_gpu=True)
    return DeviceMemory(
        sum(gpu_free) + cpu_free, f"{len(gpu_free)} GPU(s) and CPU RAM together", includes_gpu=True
    )


def check_memory(
    model_directory: Path,
    config: PretrainedConfig,
    dtype: torch.dtype,
    quantization: str | None,
    checkpoint_method: str | None,
    options: ModelLoadOptions,
    label: str,
) -> None:
    """Stop with a clear message, before loading, when the weights cannot fit the chosen devices."""
    memory = available_memory(options.device_map)
    if checkpoint_method and (checkpoint_method.startswith("bitsandbytes") or memory.includes_gpu):
        # Kept in its packed format (bitsandbytes anywhere; MXFP4/FP8 where GPU kernels exist).
        needed, described = checkpoint_bytes(model_directory), f"as stored ({checkpoint_method})"
    else:
        needed = estimate_weight_bytes(config, dtype, quantization)
        described = f"in {_dtype_name(dtype)}" + (f" quantised to {quantization}" if quantization else "")
    if needed * (1 + MEMORY_HEADROOM_FRACTION) <= memory.free_bytes:
        return
    suggestions = []
    if quantization is None and checkpoint_method is None:
        four_bit = estimate_weight_bytes(config, dtype, "4bit")
        eight_bit = estimate_weight_bytes(config, dtype, "8bit")
        suggestions.append(
            f"{options.quantization_flag} 4bit (about {_gib(four_bit)}) or 8bit (about {_gib(eight_bit)})"
        )
    if options.device_map in ("cpu", "cuda"):
        suggestions.append("--device-map auto to spread the layers over all GPUs and CPU RAM")
    else:
        suggestions.append(
            "a machine with more memory (--device-map auto already uses every GPU and CPU RAM)"
        )
    raise UserError(
        f"{label}: the weights need about {_gib(needed)} {described} (plus "
        f"{MEMORY_HEADROOM_FRACTION:.0%} headroom) but {memory.description} has only "
        f"{_gib(memory.free_bytes)} free; "
        f"try {' or '.join(suggestions)}"
    )


def cpu_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


# ---- model structure -------------------------------------------------------------------------


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The text decoder layers of `model`, also inside multimodal wrappers (`language_model`)."""
    expected = (
        getattr(text_config(model.config), "num_hidden_layers", None) if hasattr(model, "config") else None
    )
    for path in DECODER_LAYER_PATHS:
        candidate: Any = model
        for attribute in path.split("."):
            candidate = getattr(candidate, attribute, None)
            if candidate is None:
                break
        if isinstance(candidate, nn.ModuleList) and (expected is None or len(candidate) == expected):
            return candidate
    raise UserError(
        f"cannot find the decoder layers of {type(model).__name__}; "
        f"looked for {', '.join(DECODER_LAYER_PATHS)}"
    )


def input_device(model: nn.Module) -> torch.device:
    """Where token ids must go: the device of the input embedding."""
    return model.get_input_embeddings().weight.device


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _gib(size: float) -> str:
    return f"{size / GIB:.1f} GiB"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
