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

# `nn.Linear` weight [hidden, in]: each column is a vector added to the residual stream.
RESIDUAL_FIRST = 0
# [..., hidden]: each row lives in residual space (fused GPT-OSS experts, biases, routers, embeddings).
RESIDUAL_LAST = -1


class Role(str, Enum):
    WRITER = "writer"  # its output is added to the residual stream
    READER = "reader"  # it reads the (normed) residual stream


@dataclass(frozen=True)
class Gain:
    """The gain of a norm between a tensor and the residual stream: `offset + weight`.

    `norm` is the norm's tensor name inside the same decoder layer. Gemma stores `weight - 1`
    (its norms multiply by `1 + weight`), hence the offset.
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

_QWEN2_MOE = Family(
    "qwen2_moe",
    rules=(
        *_ATTENTION,
        *_DENSE_MLP,  # layers listed in `mlp_only_layers` keep a dense MLP
        *_PER_EXPERT_DOWN_PROJ,
        *_linear_writer(r"mlp\.shared_expert\.down_proj", SHARED_EXPERT_OUTPUT),
        _router(r"mlp\.gate", _PRE_MLP_NORM),
        # The shared expert's sigmoid gate reads the same normed residual as the router: making it
        # blind to the direction keeps the shared expert's share independent of the direction too.
        _router(r"mlp\.shared_expert_gate", _PRE_MLP_NORM),
    ),
    expert_count_key="num_experts",
    shared_expert_in_moe_layers=True,
    loaded_names=(_STACKED_DOWN_PROJ,),
)

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
}

SUPPORTED_MODEL_TYPES = tuple(sorted(FAMILIES))


def family_for(model_type: str | None) -> Family | None:
    return FAMILIES.get(model_type or "")


def layer_tensor_pattern(model_prefix: str, rule: TensorRule) -> re.Pattern[str]:
    """Full-name pattern of `rule` under `model_prefix`, capturing the whole layer number."""
    return re.compile(rf"{re.escape(model_prefix)}layers\.(?P<layer>0|[1-9][0-9]*)\.{rule.suffix}")
