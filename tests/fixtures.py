"""Builders of tiny, random, real-architecture checkpoints for tests, benchmarks and examples.

Every fixture is a complete Hugging Face model directory: weights written by transformers'
own `save_pretrained` (multi-shard or a single `model.safetensors`), a config, and a small
byte-level tokenizer with a chat template. Nothing is downloaded.

Architecture knowledge for the fixtures is data: `FAMILY_CONFIGS` maps a transformers
`model_type` to the config overrides that make a tiny model of that family. Hidden size equals
intermediate size everywhere, so an edit along the wrong axis can never be caught by a shape
error alone. Adding a family is adding one entry here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tokenizers import processors
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    PreTrainedTokenizerFast,
)

from demo.tokenizer_training import train_byte_level_bpe
from lib.ablate.architectures import FAMILIES, TensorRule

HIDDEN_SIZE = 64
DEFAULT_NUM_LAYERS = 4
SMALL_SHARD_BYTES = 60_000
TOKENIZER_VOCAB_SIZE = 384

BOS_TOKEN = "<bos>"
EOS_TOKEN = "<eos>"
PAD_TOKEN = "<pad>"
TURN_START = "<|start|>"
TURN_END = "<|end|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, TURN_START, TURN_END]

# The template itself writes BOS, as Llama 3, Gemma and many others do, while the tokenizer's
# post-processor also prepends BOS to any plain encode: tokenising the rendered template naively
# therefore yields two BOS tokens, which is exactly the trap the measurement code must avoid.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start|>{{ message['role'] }}\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}"
)

_COMMON_CONFIG: dict[str, Any] = dict(
    hidden_size=HIDDEN_SIZE,
    intermediate_size=HIDDEN_SIZE,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    initializer_range=0.2,
)

_MOE_EXPERTS = 4
# DeepSeek's MoE layout (GLM-4.5 too): a dense first layer, then routed experts and a shared expert.
_DEEPSEEK_MOE_SETTINGS: dict[str, Any] = dict(
    n_routed_experts=_MOE_EXPERTS,
    num_experts_per_tok=2,
    moe_intermediate_size=HIDDEN_SIZE,
    n_shared_experts=1,
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
)
# DeepSeek V2 and V3 add multi-head latent attention.
_DEEPSEEK_SETTINGS: dict[str, Any] = dict(
    **_DEEPSEEK_MOE_SETTINGS,
    kv_lora_rank=16,
    q_lora_rank=16,
    qk_rope_head_dim=8,
    head_dim=8,  # DeepSeek's rotary embedding is sized by head_dim, which must equal qk_rope_head_dim
    qk_nope_head_dim=8,
    v_head_dim=16,
)
_SLIDING_AND_FULL = ["sliding_attention", "full_attention"] * (DEFAULT_NUM_LAYERS // 2)
# Llama 4: MoE (routed + shared expert) in every second layer (1, 3), a dense MLP in the others.
_LLAMA4_SETTINGS: dict[str, Any] = dict(
    num_local_experts=_MOE_EXPERTS,
    num_experts_per_tok=1,
    intermediate_size_mlp=HIDDEN_SIZE,
    interleave_moe_layer_step=2,
)
# Qwen3-Next / Qwen3.5: full attention and linear attention (Gated DeltaNet) layers alternate; the
# linear attention's output projection is square too ([hidden, value heads x value head size]). Full
# attention comes first: freshly initialised linear attention decays its state within a few tokens,
# so as layer 0 it would make every prompt's last residual the same (its chat-template suffix).
_GATED_DELTANET_SETTINGS: dict[str, Any] = dict(
    layer_types=["full_attention", "linear_attention"] * (DEFAULT_NUM_LAYERS // 2),
    linear_num_value_heads=4,
    linear_value_head_dim=HIDDEN_SIZE // 4,
    linear_num_key_heads=2,
    linear_key_head_dim=16,
)
_QWEN3_NEXT_SETTINGS: dict[str, Any] = dict(
    **_GATED_DELTANET_SETTINGS,
    num_experts=_MOE_EXPERTS,
    num_experts_per_tok=2,
    moe_intermediate_size=HIDDEN_SIZE,
    shared_expert_intermediate_size=HIDDEN_SIZE,
)
FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {},
    "gemma2": {},
    "gemma3_text": {},
    "mixtral": dict(num_local_experts=_MOE_EXPERTS, num_experts_per_tok=2),
    "qwen2_moe": dict(
        num_experts=_MOE_EXPERTS,
        num_experts_per_tok=2,
        moe_intermediate_size=HIDDEN_SIZE,
        shared_expert_intermediate_size=HIDDEN_SIZE,
    ),
    "qwen3_moe": dict(num_experts=_MOE_EXPERTS, num_experts_per_tok=2, moe_intermediate_size=HIDDEN_SIZE),
    "gpt_oss": dict(
        num_local_experts=_MOE_EXPERTS,
        num_experts_per_tok=2,
        sliding_window=16,
        rope_parameters={"rope_type": "default", "rope_theta": 150000.0},
    ),
    # Multi-head latent attention has one key/value head per query head (as the released configs say);
    # with fewer, padded batches (an attention mask) fail inside the attention. Weight shapes do not change.
    "deepseek_v2": {**_DEEPSEEK_SETTINGS, "num_key_value_heads": 4},
    "deepseek_v3": {**_DEEPSEEK_SETTINGS, "num_key_value_heads": 4},
    "phi3": {},
    "smollm3": {},
    "seed_oss": dict(attention_out_bias=True),  # o_proj's bias is a residual writer too
    "olmo2": {},
    "exaone4": dict(sliding_window=512, layer_types=_SLIDING_AND_FULL),
    "cohere2": dict(sliding_window=512, layer_types=_SLIDING_AND_FULL),
    "llama4_text": _LLAMA4_SETTINGS,
    "qwen3_next": {**_QWEN3_NEXT_SETTINGS, "mlp_only_layers": [2]},  # layer 2 keeps a dense MLP
    "qwen3_5_text": _GATED_DELTANET_SETTINGS,
    "qwen3_5_moe_text": _QWEN3_NEXT_SETTINGS,
    "glm4_moe": _DEEPSEEK_MOE_SETTINGS,
    "ernie4_5_moe": dict(
        moe_num_experts=_MOE_EXPERTS,
        moe_k=2,
        moe_intermediate_size=HIDDEN_SIZE,
        moe_num_shared_experts=1,
        moe_layer_start_index=1,  # layer 0 is dense
    ),
    "minimax_m2": dict(num_local_experts=_MOE_EXPERTS, num_experts_per_tok=2),
    # Scalars on the residual writes and the embedding: they change no direction, and must not matter.
    "granitemoe": dict(
        num_local_experts=_MOE_EXPERTS,
        num_experts_per_tok=2,
        residual_multiplier=0.5,
        embedding_multiplier=3.0,
    ),
}

_TINY_VISION: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=28,
    patch_size=14,
)
_QWEN3_5_VISION: dict[str, Any] = dict(
    depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=HIDDEN_SIZE, patch_size=14
)
# Multimodal wrappers: the text model sits under a `language_model` prefix beside a vision tower.
# Each entry names the text family it wraps and the wrapper's own (tiny) settings.
MULTIMODAL_FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "gemma3": (
        "gemma3_text",
        dict(
            vision_config=_TINY_VISION,
            mm_tokens_per_image=4,
            image_token_index=5,
            boi_token_index=6,
            eoi_token_index=7,
        ),
    ),
    "llama4": (
        "llama4_text",
        dict(
            vision_config=dict(
                **_TINY_VISION,
                vision_output_dim=32,
                projector_input_dim=32,
                projector_output_dim=32,
            ),
        ),
    ),
    "qwen3_5": ("qwen3_5_text", dict(vision_config=_QWEN3_5_VISION)),
    "qwen3_5_moe": ("qwen3_5_moe_text", dict(vision_config=_QWEN3_5_VISION)),
}

ALL_FAMILIES = sorted([*FAMILY_CONFIGS, *MULTIMODAL_FAMILIES])


def families_with(predicate: Callable[[TensorRule], bool]) -> list[str]:
    """The fixture families with a rule in lib/architectures.FAMILIES for which `predicate` holds."""
    return [model_type for model_type in ALL_FAMILIES if any(map(predicate, FAMILIES[model_type].rules))]


# Mixture-of-experts families: routed experts, and a router reading the residual stream.
MOE_FAMILIES = families_with(lambda rule: rule.is_expert)


_TOKENIZER_CORPUS = [
    "How do I bake bread at home? Explain the steps of a recipe in detail.",
    "Write a short poem about the sea, the sky and the mountains.",
    "I'm sorry, but I can't help with that request.",
    "Sure, here is a simple answer to your question about science and history.",
    "Tell me how to pick a lock, build a weapon or hack into an account.",
]


def build_tokenizer(vocab_size: int = TOKENIZER_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer with BOS/EOS/PAD, left padding and a chat template."""
    backend = train_byte_level_bpe(_TOKENIZER_CORPUS * 4, vocab_size, SPECIAL_TOKENS)
    bos_id = backend.token_to_id(BOS_TOKEN)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[TURN_START, TURN_END],
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_config(model_type: str, num_hidden_layers: int = DEFAULT_NUM_LAYERS, **overrides: Any):
    """A tiny transformers config of the given family (see FAMILY_CONFIGS, MULTIMODAL_FAMILIES)."""
    if model_type in MULTIMODAL_FAMILIES:
        text_family, wrapper_settings = MULTIMODAL_FAMILIES[model_type]
        text_config = build_config(text_family, num_hidden_layers, **overrides).to_dict()
        for key in ("architectures", "model_type", "transformers_version", "dtype"):
            text_config.pop(key, None)
        return AutoConfig.for_model(model_type, text_config=text_config, **wrapper_settings)
    if model_type not in FAMILY_CONFIGS:
        raise ValueError(f"no fixture for model_type {model_type!r}; known: {ALL_FAMILIES}")
    settings = {**_COMMON_CONFIG, **FAMILY_CONFIGS[model_type], "num_hidden_layers": num_hidden_layers}
    # Headroom above the tokenizer's size: some families' tokenizer classes add a token on load.
    settings.update(vocab_size=TOKENIZER_VOCAB_SIZE + 32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    settings.update(overrides)
    if (
        "layer_types" in settings
    ):  # a repeating pattern, written for DEFAULT_NUM_LAYERS: stretch it to the count
        pattern = settings["layer_types"]
        settings["layer_types"] = [pattern[layer % len(pattern)] for layer in range(num_hidden_layers)]
    return AutoConfig.for_model(model_type, **settings)


def build_fixture(
    model_type: str,
    output_dir: Path,
    *,
    single_file: bool = False,
    num_hidden_layers: int = DEFAULT_NUM_LAYERS,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    max_shard_size: int = SMALL_SHARD_BYTES,
    randomize_norms_and_biases: bool = False,
    **config_overrides: Any,
) -> Path:
    """Write a random tiny model of `model_type` with tokenizer and chat template to `output_dir`.

    `single_file=True` writes one `model.safetensors`; otherwise shards of at most
    `max_shard_size` bytes with a `model.safetensors.index.json`. `randomize_norms_and_biases=True`
    shifts every norm gain by uniform noise in [-0.75, 1.25) and draws every bias at random: fresh
    norms are all ones (all zeros under Gemma's `1 + weight`) and fresh biases all zeros, which
    would hide any mistake in how a gain or a bias is handled.
    """
    output_dir = Path(output_dir)
    config = build_config(model_type, num_hidden_layers, **config_overrides)
    torch.manual_seed(seed)
    # Wrappers are built (and saved) whole, vision tower included, as released: AutoModelForCausalLM
    # would build some of them (Qwen3.5, Llama 4) as their text model alone.
    model_class = AutoModelForImageTextToText if model_type in MULTIMODAL_FAMILIES else AutoModelForCausalLM
    model = model_class.from_config(config, dtype=dtype)
    if randomize_norms_and_biases:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "norm" in name and parameter.dim() == 1:
                    parameter.add_(torch.rand_like(parameter) * 2.0 - 0.75)
                elif name.endswith("bias"):
                    parameter.normal_(0.0, 0.2)
    model.generation_config.pad_token_id = build_tokenizer().pad_token_id
    shard_size = 1 << 40 if single_file else max_shard_size
    model.save_pretrained(output_dir, max_shard_size=shard_size)
    build_tokenizer().save_pretrained(output_dir)
    return output_dir


def copy_without_chat_template(model_directory: Path, destination: Path) -> Path:
    """A copy of a fixture whose tokenizer has no chat template (as a base model's has none)."""
    shutil.copytree(model_directory, destination)
    (destination / "chat_template.jinja").unlink(missing_ok=True)
    config_path = destination / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    return destination


# Ways model files break on disk (an interrupted download or copy, a hand edit), for the error tests.
DAMAGES = (
    "truncated shard",
    "overwritten shard header",
    "missing shard",
    "config.json cut short",
    "index cut short",
)


def damaged_copy(model_directory: Path, destination: Path, damage: str) -> tuple[Path, Path]:
    """Copy a sharded fixture to `destination` and break one file as `damage` (one of DAMAGES) says.

    Returns the copy and the file an error message must name: the broken file, or for a missing
    shard the index that lists it.
    """
    copy = Path(shutil.copytree(model_directory, destination))
    shard = sorted(copy.glob("model-*.safetensors"))[1]
    index = copy / "model.safetensors.index.json"
    if damage == "truncated shard":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
        return copy, shard
    if damage == "overwritten shard header":
        with open(shard, "r+b") as handle:
            handle.write(b"\xff" * 8)  # the header length: far beyond the file
        return copy, shard
    if damage == "missing shard":
        shard.unlink()
        return copy, index
    broken = {"config.json cut short": copy / "config.json", "index cut short": index}[damage]
    broken.write_text(broken.read_text()[:-5])
    return copy, broken


def install_in_hub_cache(
    model_directory: Path, cache_directory: Path, repo_id: str, revision: str = "a" * 40
) -> Path:
    """Lay `model_directory` out as the hub cache does (blobs + snapshot symlinks + refs/main).

    Point HF_HUB_CACHE at `cache_directory` to make `repo_id` resolvable offline. Returns the snapshot.
    """
    repository = Path(cache_directory) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repository / "snapshots" / revision
    blobs = repository / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text(revision)
    for source in Path(model_directory).iterdir():
        blob = blobs / f"{source.name}.blob"
        shutil.copyfile(source, blob)
        (snapshot / source.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


# Pre-quantised checkpoints as they ship on the hub (original GPT-OSS in MXFP4, DeepSeek-style block FP8):
# the weights on disk are packed integers plus scales, and config.json carries a non-bitsandbytes
# `quantization_config`. Built by quantising a dense fixture, so loaders can be tested without a download.
MXFP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MXFP4_GROUP = 32
MXFP4_SCALE_BIAS = 127
MXFP4_EXPERT_TENSORS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
FP8_BLOCK = 32
FP8_MAX = 448.0  # largest float8_e4m3fn value


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack a fused GPT-OSS expert tensor [experts, in, out] as (blocks, scales) in the checkpoint layout.

    The checkpoint stores each expert transposed ([experts, out, in]) with `in` cut into groups of 32
    values sharing one power-of-two scale (stored as exponent + 127); each byte packs two FP4 (e2m1)
    codes, the even element in the low nibble.
    """
    transposed = weight.transpose(1, 2).to(torch.float32)
    experts, rows, columns = transposed.shape
    groups = transposed.reshape(experts, rows, columns // MXFP4_GROUP, MXFP4_GROUP)
    largest = groups.abs().amax(dim=-1, keepdim=True).clamp(min=1e-30)
    exponents = torch.ceil(torch.log2(largest / max(MXFP4_VALUES)))
    scaled = groups / torch.pow(2.0, exponents)
    codebook = torch.tensor(MXFP4_VALUES)
    codes = (scaled.unsqueeze(-1) - codebook).abs().argmin(dim=-1).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    scales = (exponents.squeeze(-1) + MXFP4_SCALE_BIAS).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()


def quantize_fp8_blockwise(weight: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise float8_e4m3fn weight and its `weight_scale_inv` grid (weight ≈ fp8 * scale_inv)."""
    rows, columns = weight.shape
    tiles = weight.to(torch.float32).reshape(rows // block, block, columns // block, block)
    scale_inverse = (tiles.abs().amax(dim=(1, 3), keepdim=True) / FP8_MAX).clamp(min=1e-12)
    quantized = (tiles / scale_inverse).reshape(rows, columns).to(torch.float8_e4m3fn)
    return quantized, scale_inverse.reshape(rows // block, columns // block)


def _mxfp4_tensors(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    if not name.endswith(MXFP4_EXPERT_TENSORS):
        return {name: tensor}
    blocks, scales = quantize_mxfp4(tensor)
    return {f"{name}_blocks": blocks, f"{name}_scales": scales}


def _fp8_tensors(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    is_decoder_linear = ".layers." in name and name.endswith("proj.weight") and tensor.dim() == 2
    if not is_decoder_linear or tensor.shape[0] % FP8_BLOCK or tensor.shape[1] % FP8_BLOCK:
        return {name: tensor}
    quantized, scale_inverse = quantize_fp8_blockwise(tensor)
    return {name: quantized, name.replace(".weight", ".weight_scale_inv"): scale_inverse}


PREQUANTIZED_FORMATS: dict[str, tuple[Any, dict[str, Any]]] = {
    "mxfp4": (
        _mxfp4_tensors,
        {
            "quant_method": "mxfp4",
            "modules_to_not_convert": [
                "model.layers.*.self_attn",
                "model.layers.*.mlp.router",
                "model.embed_tokens",
                "lm_head",
            ],
        },
    ),
    "fp8": (
        _fp8_tensors,
        {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
        },
    ),
}


def build_prequantized_fixture(model_type: str, output_dir: Path, quant_method: str, **options: Any) -> Path:
    """A fixture whose checkpoint is pre-quantised (`mxfp4`: GPT-OSS experts; `fp8`: decoder linears).

    Built like `build_fixture`, then every shard is rewritten with the packed tensors and config.json
    gains the `quantization_config` a hub checkpoint of that format carries.
    """
    convert, quantization_config = PREQUANTIZED_FORMATS[quant_method]
    output_dir = build_fixture(model_type, output_dir, **options)
    weight_map: dict[str, str] = {}
    for shard in sorted(output_dir.glob("*.safetensors")):
        converted: dict[str, torch.Tensor] = {}
        for name, tensor in load_file(shard).items():
            converted.update(convert(name, tensor))
        save_file(converted, shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(converted, shard.name))
    index_path = output_dir / "model.safetensors.index.json"
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        index["weight_map"] = dict(sorted(weight_map.items()))
        index_path.write_text(json.dumps(index, indent=2))
    config_path = output_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = dict(quantization_config)
    config_path.write_text(json.dumps(config, indent=2))
    return output_dir


_PER_EXPERT = re.compile(
    r"(?P<experts>.+\.mlp\.experts)\.(?P<expert>\d+)\.(?P<projection>gate|up|down)_proj\.weight"
)


def fuse_routed_experts(model: Path) -> None:
    """Rewrite each layer's per-expert `mlp.experts.E.{gate,up,down}_proj.weight` as the two stacked
    tensors Qwen3.5-MoE releases store: `mlp.experts.gate_up_proj` [experts, 2 x intermediate, hidden]
    and `mlp.experts.down_proj` [experts, hidden, intermediate], in the shard that held expert 0's."""
    index_path = model / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = {
        file_name: load_file(model / file_name) for file_name in sorted(set(index["weight_map"].values()))
    }
    experts: dict[str, dict[tuple[str, int], torch.Tensor]] = defaultdict(dict)
    home: dict[str, str] = {}
    for file_name, tensors in shards.items():
        for name in [name for name in tensors if _PER_EXPERT.fullmatch(name)]:
            match = _PER_EXPERT.fullmatch(name)
            experts[match["experts"]][match["projection"], int(match["expert"])] = tensors.pop(name)
            home.setdefault(match["experts"], file_name)
    for prefix, parts in experts.items():
        count = 1 + max(expert for _, expert in parts)
        gate_up = [torch.cat([parts["gate", expert], parts["up", expert]]) for expert in range(count)]
        shards[home[prefix]][f"{prefix}.gate_up_proj"] = torch.stack(gate_up)
        shards[home[prefix]][f"{prefix}.down_proj"] = torch.stack([parts["down", e] for e in range(count)])
    weight_map = {}
    for file_name, tensors in shards.items():
        if not tensors:
            (model / file_name).unlink()
            continue
        save_file(tensors, model / file_name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file_name))
    index["weight_map"] = dict(sorted(weight_map.items()))
    index_path.write_text(json.dumps(index, indent=2))
