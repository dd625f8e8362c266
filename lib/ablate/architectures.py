"""Architecture knowledge as data: which checkpoint tensors write to or read from the residual stream.

One table, `FAMILIES`, keyed by the `model_type` of config.json. For every tensor the ablation may
edit it records the component it belongs to, whether it writes to the residual stream or reads
from it, how many axes it has and which is the residual axis, and which norm gain stands between
the tensor and the residual stream. Nothing here is inferred from shapes: families exist where
hidden size equals intermediate size, so orientation must come from the table (the shapes are
checked against it and config.json when a checkpoint is opened).

Tensor names on disk are `{prefix}layers.{L}.{suffix}`; `suffix` patterns are matched in full and
the layer index is matched as a whole number, so layer 3 never matches layer 30.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from enum import Enum

ATTENTION_OUTPUT = "attention_output"
MLP_OUTPUT = "mlp_output"
SHARED_EXPERT_OUTPUT = "shared_expert_output"
ROUTER = "router"
BIASES = "biases"

# Components a plan entry may select; `biases` switches the biases of the selected writers on or off.
LAYER_COMPONENTS = (ATTENTION_OUTPUT, MLP_OUTPUT, SHARED_EXPERT_OUTPUT, ROUTER, BIASES)
DEFAULT_COMPONENTS = frozenset(LAYER_COMPONENTS)

# `nn.Linear` weight [hidden, in], alone or stacked per expert [experts, hidden, in] (Granite MoE): the
# residual axis is each matrix's first, and each column is a vector added to the residual stream.
RESIDUAL_FIRST = -2
# [..., hidden]: each row lives in residual space (fused GPT-OSS / Llama 4 experts [experts, in, hidden],
# biases, routers, embeddings).
RESIDUAL_LAST = -1


class Role(str, Enum):
    WRITER = "writer"  # its output is added to the residual stream
    READER = "reader"  # it reads the (normed) residual stream


@dataclass(frozen=True)
class Gain:
    """The gain of a norm between a tensor and the residual stream: `offset + weight`.

    `norm` is the norm's tensor name inside the same decoder layer. Gemma, Qwen3-Next and Qwen3.5
    store `weight - 1` (their norms multiply by `1 + weight`), hence the offset.
    """

    norm: str
    offset: float = 0.0


@dataclass(frozen=True)
class TensorRule:
    suffix: str  # regular expression for the name after `layers.{L}.`, matched in full
    component: str
    role: Role
    residual_axis: int
    axes: int  # how many axes the tensor has (a Linear weight 2, its bias 1, fused experts one more)
    is_bias: bool = False
    gain: Gain | None = None
    is_expert: bool = False  # a routed expert's tensor: its presence marks the layer as a MoE layer


@dataclass(frozen=True)
class Layout:
    """Where a family's text model sits in the checkpoint's tensor names."""

    model_prefix: str  # before `layers.`, `embed_tokens.weight`, `norm.weight`
    lm_head: str


@dataclass(frozen=True)
class LoadedName:
    """Where transformers keeps a checkpoint tensor once it has loaded the model, where that differs.

    transformers 5 stacks the routed experts' per-expert matrices into one parameter, expert first,
    and renames some modules: a tensor whose name after `layers.{L}.` matches `suffix` is
    `layers.{L}.{parameter}` in memory, indexed by the `expert` group when the pattern has one.
    Only previews and search trials (lib/ablate/in_memory_edit.py) need this; the checkpoint's own names
    are what sharded_ablate.py reads and writes.
    """

    suffix: str  # regular expression, matched in full
    parameter: str


@dataclass(frozen=True)
class Family:
    name: str
    rules: tuple[TensorRule, ...]
    ties_embeddings_by_default: bool = False
    expert_count_key: str | None = None  # config key holding the number of routed experts
    shared_expert_in_moe_layers: bool = False
    layouts: tuple[Layout, ...] = (Layout("model.", "lm_head.weight"),)
    text_config_key: str | None = None  # multimodal wrappers: the key of the text model's config
    # GPT-OSS original checkpoints store these fused expert tensors as MXFP4 `*_blocks`/`*_scales`.
    packed_expert_tensors: tuple[str, ...] = ()
    loaded_names: tuple[LoadedName, ...] = ()


def _linear_writer(
    module: str, component: str, gain: Gain | None = None, is_expert: bool = False
) -> tuple[TensorRule, TensorRule]:
    """An `nn.Linear` that writes to the residual stream: its weight and (when present) its bias."""
    return (
        TensorRule(
            rf"{module}\.weight", component, Role.WRITER, RESIDUAL_FIRST, 2, gain=gain, is_expert=is_expert
        ),
        TensorRule(
            rf"{module}\.bias",
            component,
            Role.WRITER,
            RESIDUAL_LAST,
            1,
            is_bias=True,
            gain=gain,
            is_expert=is_expert,
        ),
    )


def _router(module: str, gain: Gain) -> TensorRule:
    return TensorRule(rf"{module}\.weight", ROUTER, Role.READER, RESIDUAL_LAST, 2, gain=gain)


_EXPERT = r"(?P<expert>\d+)"
# Llama-style blocks: the norm called `post_attention_layernorm` feeds the MLP block (it is a pre-norm).
_PRE_MLP_NORM = Gain("post_attention_layernorm.weight")
# Gemma 2/3 sandwich norms: the block outputs pass through these before the residual add.
_GEMMA_ATTENTION_GAIN = Gain("post_attention_layernorm.weight", offset=1.0)
_GEMMA_MLP_GAIN = Gain("post_feedforward_layernorm.weight", offset=1.0)

_ATTENTION = _linear_writer(r"self_attn\.o_proj", ATTENTION_OUTPUT)
_DENSE_MLP = _linear_writer(r"mlp\.down_proj", MLP_OUTPUT)

_DENSE = Family("dense", rules=(*_ATTENTION, *_DENSE_MLP))

_GEMMA = Family(
    "gemma",
    rules=(
        *_linear_writer(r"self_attn\.o_proj", ATTENTION_OUTPUT, _GEMMA_ATTENTION_GAIN),
        *_linear_writer(r"mlp\.down_proj", MLP_OUTPUT, _GEMMA_MLP_GAIN),
    ),
    ties_embeddings_by_default=True,
)

_PER_EXPERT_DOWN_PROJ = _linear_writer(rf"mlp\.experts\.{_EXPERT}\.down_proj", MLP_OUTPUT, is_expert=True)
_STACKED_DOWN_PROJ = LoadedName(rf"mlp\.experts\.{_EXPERT}\.down_proj\.weight", "mlp.experts.down_proj")


def _moe_with_gated_shared_expert(name: str, attention: tuple[TensorRule, ...], pre_mlp_norm: Gain) -> Family:
    """Qwen's MoE block: routed experts (a dense MLP in `mlp_only_layers`) plus a shared expert whose
    sigmoid gate reads the same normed residual as the router."""
    return Family(
        name,
        rules=(
            *attention,
            *_DENSE_MLP,
            *_PER_EXPERT_DOWN_PROJ,
            *_linear_writer(r"mlp\.shared_expert\.down_proj", SHARED_EXPERT_OUTPUT),
            _router(r"mlp\.gate", pre_mlp_norm),
            # Making the gate blind too keeps the shared expert's share independent of the direction.
            _router(r"mlp\.shared_expert_gate", pre_mlp_norm),
        ),
        expert_count_key="num_experts",
        shared_expert_in_moe_layers=True,
        loaded_names=(_STACKED_DOWN_PROJ,),
    )


_QWEN2_MOE = _moe_with_gated_shared_expert("qwen2_moe", _ATTENTION, _PRE_MLP_NORM)

_QWEN3_MOE = Family(
    "qwen3_moe",
    rules=(*_ATTENTION, *_DENSE_MLP, *_PER_EXPERT_DOWN_PROJ, _router(r"mlp\.gate", _PRE_MLP_NORM)),
    expert_count_key="num_experts",
    loaded_names=(_STACKED_DOWN_PROJ,),
)

_MIXTRAL = Family(
    "mixtral",
    rules=(
        *_ATTENTION,
        *_linear_writer(rf"block_sparse_moe\.experts\.{_EXPERT}\.w2", MLP_OUTPUT, is_expert=True),
        _router(r"block_sparse_moe\.gate", _PRE_MLP_NORM),
    ),
    expert_count_key="num_local_experts",
    loaded_names=(
        LoadedName(rf"block_sparse_moe\.experts\.{_EXPERT}\.w2\.weight", "mlp.experts.down_proj"),
        LoadedName(r"block_sparse_moe\.gate\.weight", "mlp.gate.weight"),
    ),
)

_DEEPSEEK = Family(
    "deepseek",
    rules=(
        *_ATTENTION,
        *_DENSE_MLP,  # the first `first_k_dense_replace` layers are dense
        *_PER_EXPERT_DOWN_PROJ,
        *_linear_writer(r"mlp\.shared_experts\.down_proj", SHARED_EXPERT_OUTPUT),
        _router(r"mlp\.gate", _PRE_MLP_NORM),
    ),
    expert_count_key="n_routed_experts",
    shared_expert_in_moe_layers=True,
    loaded_names=(_STACKED_DOWN_PROJ,),
)

_GPT_OSS = Family(
    "gpt_oss",
    rules=(
        *_ATTENTION,
        # Fused experts [experts, intermediate, hidden] with `out = x @ W[e]`: the residual axis is last.
        TensorRule(r"mlp\.experts\.down_proj", MLP_OUTPUT, Role.WRITER, RESIDUAL_LAST, 3, is_expert=True),
        TensorRule(
            r"mlp\.experts\.down_proj_bias",
            MLP_OUTPUT,
            Role.WRITER,
            RESIDUAL_LAST,
            2,
            is_bias=True,
            is_expert=True,
        ),
        _router(r"mlp\.router", _PRE_MLP_NORM),
    ),
    expert_count_key="num_local_experts",
    packed_expert_tensors=("mlp.experts.down_proj", "mlp.experts.gate_up_proj"),
)

# Post-norms without an offset (OLMo 2, EXAONE 4): each block's output passes through its own norm
# before the residual add, and the MLP reads the residual stream with no norm at all.
_POST_NORM = Family(
    "post_norm",
    rules=(
        *_linear_writer(r"self_attn\.o_proj", ATTENTION_OUTPUT, Gain("post_attention_layernorm.weight")),
        *_linear_writer(r"mlp\.down_proj", MLP_OUTPUT, Gain("post_feedforward_layernorm.weight")),
    ),
)

# Qwen3-Next and Qwen3.5: hybrid layers, either gated full attention (`self_attn.o_proj`) or Gated
# DeltaNet linear attention (`linear_attn.out_proj`, after its own gated norm inside the block) writes
# the residual; both are the layer's attention output. Pre-norms stored as `weight - 1`.
_ZERO_CENTRED_PRE_MLP_NORM = Gain("post_attention_layernorm.weight", offset=1.0)
_HYBRID_ATTENTION = (*_ATTENTION, *_linear_writer(r"linear_attn\.out_proj", ATTENTION_OUTPUT))
_QWEN3_5_DENSE = Family("qwen3_5_dense", rules=(*_HYBRID_ATTENTION, *_DENSE_MLP))
_QWEN3_NEXT = _moe_with_gated_shared_expert("qwen3_next", _HYBRID_ATTENTION, _ZERO_CENTRED_PRE_MLP_NORM)
# Qwen3.5 MoE releases store each layer's routed experts stacked, as transformers 5 holds them in
# memory: `mlp.experts.down_proj` [experts, hidden, intermediate] (each expert an `nn.Linear` weight,
# so the residual axis is each matrix's first) beside `mlp.experts.gate_up_proj`; transformers'
# save_pretrained writes them one tensor per expert, as Qwen3-Next stores them.
_QWEN3_5_MOE = replace(
    _QWEN3_NEXT,
    name="qwen3_5_moe",
    rules=(
        *_QWEN3_NEXT.rules,
        TensorRule(r"mlp\.experts\.down_proj", MLP_OUTPUT, Role.WRITER, RESIDUAL_FIRST, 3, is_expert=True),
    ),
)
# The released Qwen3.5 models are vision-language checkpoints (`model.language_model.layers.*`);
# AutoModelForCausalLM loads their text model alone, as `model.layers.*`.
_QWEN3_5_LAYOUTS = (Layout("model.language_model.", "lm_head.weight"), Layout("model.", "lm_head.weight"))

# Llama 4: the MLP block is `feed_forward`. MoE layers (every `interleave_moe_layer_step`-th) add a
# shared expert's output and the routed experts' (fused [experts, intermediate, hidden], no biases;
# the router's sigmoid scores scale each expert's input); the other layers have a dense MLP.
_LLAMA4 = Family(
    "llama4",
    rules=(
        *_ATTENTION,
        *_linear_writer(r"feed_forward\.down_proj", MLP_OUTPUT),
        TensorRule(
            r"feed_forward\.experts\.down_proj", MLP_OUTPUT, Role.WRITER, RESIDUAL_LAST, 3, is_expert=True
        ),
        *_linear_writer(r"feed_forward\.shared_expert\.down_proj", SHARED_EXPERT_OUTPUT),
        _router(r"feed_forward\.router", _PRE_MLP_NORM),
    ),
    expert_count_key="num_local_experts",
    shared_expert_in_moe_layers=True,
)

# Granite MoE: experts fused per layer as `nn.Linear` weights stacked [experts, out, in], so the
# output projection is [experts, hidden, intermediate]; attention and MoE outputs are scaled by
# `residual_multiplier` (a scalar: it changes no direction). transformers 5 renames both on load.
_GRANITE_MOE = Family(
    "granitemoe",
    rules=(
        *_ATTENTION,
        TensorRule(
            r"block_sparse_moe\.output_linear\.weight",
            MLP_OUTPUT,
            Role.WRITER,
            RESIDUAL_FIRST,
            3,
            is_expert=True,
        ),
        _router(r"block_sparse_moe\.router\.layer", _PRE_MLP_NORM),
    ),
    expert_count_key="num_local_experts",
    loaded_names=(
        LoadedName(r"block_sparse_moe\.output_linear\.weight", "block_sparse_moe.experts.down_proj"),
        LoadedName(r"block_sparse_moe\.router\.layer\.weight", "block_sparse_moe.router.weight"),
    ),
)

_GEMMA3_WRAPPER = replace(
    _GEMMA,
    name="gemma3",
    text_config_key="text_config",
    layouts=(
        Layout("language_model.model.", "language_model.lm_head.weight"),  # as released and as saved
        Layout("model.language_model.", "lm_head.weight"),  # transformers' in-memory naming
    ),
)

FAMILIES: dict[str, Family] = {
    "llama": _DENSE,
    "mistral": _DENSE,
    "qwen2": _DENSE,
    "qwen3": _DENSE,
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA,
    "gemma3": _GEMMA3_WRAPPER,
    "qwen2_moe": _QWEN2_MOE,
    "qwen3_moe": _QWEN3_MOE,
    "mixtral": _MIXTRAL,
    "deepseek_v2": _DEEPSEEK,
    "deepseek_v3": _DEEPSEEK,
    "gpt_oss": _GPT_OSS,
    # Dense, Llama's names: Phi-3/Phi-4 fuse their readers (`qkv_proj`, `gate_up_proj`), which the
    # ablation never edits; Cohere 2 runs attention and MLP in parallel from one input norm and adds
    # both; SmolLM3 and Seed-OSS (biases on `o_proj` when `attention_out_bias`) are Llama blocks.
    "phi3": _DENSE,
    "cohere2": replace(_DENSE, name="cohere2", ties_embeddings_by_default=True),
    "smollm3": replace(_DENSE, name="smollm3", ties_embeddings_by_default=True),
    "seed_oss": _DENSE,
    "olmo2": _POST_NORM,
    "exaone4": _POST_NORM,
    "llama4_text": _LLAMA4,
    "llama4": replace(
        _LLAMA4,
        text_config_key="text_config",
        layouts=(
            Layout("language_model.model.", "language_model.lm_head.weight"),  # as released and as saved
            Layout("model.", "lm_head.weight"),  # AutoModelForCausalLM loads the text model alone
        ),
    ),
    "qwen3_next": _QWEN3_NEXT,
    "qwen3_5_text": replace(_QWEN3_5_DENSE, layouts=tuple(reversed(_QWEN3_5_LAYOUTS))),
    "qwen3_5_moe_text": replace(_QWEN3_5_MOE, layouts=tuple(reversed(_QWEN3_5_LAYOUTS))),
    "qwen3_5": replace(_QWEN3_5_DENSE, text_config_key="text_config", layouts=_QWEN3_5_LAYOUTS),
    "qwen3_5_moe": replace(_QWEN3_5_MOE, text_config_key="text_config", layouts=_QWEN3_5_LAYOUTS),
    # GLM-4.5/4.6 and ERNIE 4.5 are DeepSeek MoE layouts: first dense layers, routed and shared
    # experts, a router whose score-correction bias (`e_score_correction_bias`, ERNIE's `moe_statics`)
    # is added after the product with the residual, so it needs no edit.
    "glm4_moe": replace(_DEEPSEEK, name="glm4_moe"),
    "ernie4_5_moe": replace(
        _DEEPSEEK, name="ernie4_5_moe", expert_count_key="moe_num_experts", ties_embeddings_by_default=True
    ),
    # MiniMax-M2: Mixtral's names and layout, with a router score-correction bias (as GLM's).
    "minimax_m2": replace(_MIXTRAL, name="minimax_m2"),
    "granitemoe": _GRANITE_MOE,
}

SUPPORTED_MODEL_TYPES = tuple(sorted(FAMILIES))


def family_for(model_type: str | None) -> Family | None:
    return FAMILIES.get(model_type or "")


def layer_tensor_pattern(model_prefix: str, rule: TensorRule) -> re.Pattern[str]:
    """Full-name pattern of `rule` under `model_prefix`, capturing the whole layer number."""
    return re.compile(rf"{re.escape(model_prefix)}layers\.(?P<layer>0|[1-9][0-9]*)\.{rule.suffix}")
