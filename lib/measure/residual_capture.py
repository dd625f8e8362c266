"""Per-layer residual stream at the last prompt token: hooks, a shared prefix, Welford statistics.

Index convention (docs/SPEC.md §2, the same as transformers' `hidden_states`): position L is the
residual stream entering decoder layer L; L = 0 is the embedding output (the input of layer 0)
and L = N the output of the last decoder layer *before* the final norm. transformers' own
`hidden_states[-1]` is taken after the final norm for most models, so the hooks here capture the
last layer's output directly instead.

Only the last position of each layer's residual is kept (a clone of [batch, hidden]), never the
full-sequence hidden states, and the model runs as plain forward passes of its base model: no
`generate()`, no logits. Prompts run in lib/core/batching.py's length-sorted batches (longest first, so
a batch size that fits the first batch fits them all), padded on the left with explicit position
ids, so a prompt's contribution does not depend on its batch or the batch size.

Shared prefix: every chat-formatted prompt starts with the same tokens (BOS, the user-turn
header, often a long system preamble: GPT-OSS's harmony format, Llama 3's date header,
`--system-prompt`). Those are run once; their keys and values are handed to every batch as a
cache, so only each prompt's own tokens are computed again. Causal attention makes this exact.
The padding then sits between prefix and prompt, masked; for sliding-window attention, whose
window counts token slots, this is exact only while prefix + longest prompt fit in the window,
so longer batches run without the shared prefix. Models with linear attention layers (Qwen3-Next,
Qwen3.5) keep a recurrent state that would absorb that padding: they always run whole prompts.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import Cache, PreTrainedModel
from transformers.cache_utils import DynamicLayer, LinearAttentionCacheLayerMixin

from lib.core.batching import BatchSizer, run_in_batches
from lib.core.chat_format import left_pad
from lib.core.errors import warn
from lib.core.loading import decoder_layers, input_device, text_config

# transformers 5.24 renamed the key/value cache's forward argument and output field from
# `past_key_values` to `cache` and warns about the old name until its removal (planned for 5.40).
# Older 5.x releases and remote-code models know only the old name, so each model's own
# signature and output decide.
CACHE_NAME = "cache"
LEGACY_CACHE_NAME = "past_key_values"


@dataclass(frozen=True)
class ResidualStatistics:
    """Mean and per-dimension variance of the last-token residual at every position L = 0..N."""

    count: int
    mean: torch.Tensor  # [N + 1, hidden] float64
    variance: torch.Tensor  # [N + 1, hidden] float64, sample variance (divisor count - 1); zero if count < 2


class WelfordAccumulator:
    """Running mean and sum of squared deviations in float64, merged a batch at a time (Chan et al.).

    Numerically stable for many prompts with large, nearly equal activations, where summing
    squares would cancel catastrophically.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.squared_deviations: torch.Tensor | None = None

    def add(self, samples: torch.Tensor) -> None:
        """Merge `samples` [positions, batch, hidden] (any float dtype; accumulated in float64)."""
        samples = samples.to(torch.float64)
        batch_count = samples.shape[1]
        batch_mean = samples.mean(dim=1)
        batch_squared_deviations = (samples - batch_mean.unsqueeze(1)).square().sum(dim=1)
        if self.mean is None or self.squared_deviations is None:
            self.count, self.mean, self.squared_deviations = batch_count, batch_mean, batch_squared_deviations
            return
        total = self.count + batch_count
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * (batch_count / total)
        self.squared_deviations = (
            self.squared_deviations
            + batch_squared_deviations
            + delta.square() * (self.count * batch_count / total)
        )
        self.count = total

    def statistics(self) -> ResidualStatistics:
        if self.mean is None or self.squared_deviations is None:
            raise ValueError("no samples were accumulated")
        variance = (
            self.squared_deviations / (self.count - 1)
            if self.count > 1
            else torch.zeros_like(self.squared_deviations)
        )
        return ResidualStatistics(self.count, self.mean.clone(), variance)


class LastTokenCapture:
    """Forward hooks on the decoder layers keeping each residual's last position (left padding).

    Use as a context manager; the hooks are removed on exit. After a forward pass, `take()`
    returns [N + 1, batch, hidden] float64 on the CPU.
    """

    def __init__(self, layers: nn.ModuleList) -> None:
        self.layers = layers
        self.captured: list[torch.Tensor | None] = [None] * (len(layers) + 1)
        self.handles: list[Any] = []

    def __enter__(self) -> LastTokenCapture:
        self.handles.append(self.layers[0].register_forward_pre_hook(self._capture_input, with_kwargs=True))
        for index, layer in enumerate(self.layers, start=1):
            self.handles.append(layer.register_forward_hook(functools.partial(self._capture_output, index)))
        return self

    def __exit__(self, *exception: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.clear()

    def _store(self, index: int, hidden_states: torch.Tensor) -> None:
        # clone: a view would keep the whole [batch, length, hidden] tensor alive until take()
        self.captured[index] = hidden_states[:, -1, :].detach().clone()

    def _capture_input(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self._store(0, args[0] if args else kwargs["hidden_states"])

    def _capture_output(self, index: int, module: nn.Module, args: tuple, output: Any) -> None:
        self._store(index, output[0] if isinstance(output, (tuple, list)) else output)

    def take(self) -> torch.Tensor:
        missing = [index for index, tensor in enumerate(self.captured) if tensor is None]
        if missing:
            raise RuntimeError(
                f"residuals at positions {missing} were not captured; the model skipped layers"
            )
        residuals = torch.stack(
            [tensor.to("cpu", torch.float64) for tensor in self.captured if tensor is not None]
        )
        self.clear()
        return residuals

    def clear(self) -> None:
        self.captured = [None] * (len(self.layers) + 1)


def common_prefix_length(token_id_lists: Sequence[Sequence[int]]) -> int:
    """Tokens every prompt starts with, leaving at least each prompt's last token outside the prefix."""
    first = token_id_lists[0]
    shortest = min(len(ids) for ids in token_id_lists)
    length = 0
    while length < shortest - 1 and all(ids[length] == first[length] for ids in token_id_lists):
        length += 1
    return length


def sliding_window(model: PreTrainedModel) -> int | None:
    """The attention window of sliding-window layers, if the model has any."""
    config = text_config(model.config)
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    if not window or (layer_types and not any("sliding" in layer_type for layer_type in layer_types)):
        return None
    return int(window)


@dataclass(frozen=True)
class SharedPrefix:
    """The keys and values of the tokens all prompts start with, computed once (batch of one)."""

    length: int
    cache: Cache
    window: int | None
    argument_name: str  # the keyword the model's forward takes the cache by

    def fits(self, suffix_length: int) -> bool:
        return self.window is None or self.length + suffix_length <= self.window

    def cache_for_batch(self, batch_size: int) -> Cache:
        cache = copy.deepcopy(self.cache)  # each forward appends its own keys and values
        cache.batch_repeat_interleave(batch_size)
        return cache


def compute_shared_prefix(
    model: PreTrainedModel, capture: LastTokenCapture, token_id_lists: Sequence[Sequence[int]]
) -> SharedPrefix | None:
    length = common_prefix_length(token_id_lists)
    if length == 0:
        return None
    prefix = torch.tensor([list(token_id_lists[0][:length])], device=input_device(model))
    try:
        output = model.base_model(
            input_ids=prefix, position_ids=torch.arange(length, device=prefix.device)[None], use_cache=True
        )
    except (TypeError, ValueError, NotImplementedError) as error:
        warn(f"{type(model).__name__} cannot reuse a cached prompt prefix ({error}); running whole prompts")
        return None
    finally:
        capture.clear()  # the prefix's own residuals are no prompt's last token
    cache = returned_cache(output)
    if not isinstance(cache, Cache) or not only_keys_and_values(cache):
        return None
    return SharedPrefix(length, cache, sliding_window(model), cache_argument_name(model))


def only_keys_and_values(cache: Cache) -> bool:
    """Whether every layer caches attention keys and values, and nothing else.

    Padding between the prefix and a prompt is harmless only where attention masks it; a linear
    attention layer (Qwen3-Next, Qwen3.5) folds every token into a recurrent state, padding included.
    """
    return all(
        isinstance(layer, DynamicLayer) and not isinstance(layer, LinearAttentionCacheLayerMixin)
        for layer in cache.layers
    )


def cache_argument_name(model: PreTrainedModel) -> str:
    """The keyword the base model's forward takes a key/value cache by (its signature says)."""
    parameters = inspect.signature(model.base_model.forward).parameters
    return CACHE_NAME if CACHE_NAME in parameters else LEGACY_CACHE_NAME


def returned_cache(output: Any) -> Any:
    """The key/value cache a forward pass returned, under the name its output class declares."""
    declared = getattr(output, "__dataclass_fields__", {})
    return getattr(output, CACHE_NAME if CACHE_NAME in declared else LEGACY_CACHE_NAME, None)


def batch_inputs(
    rows: Sequence[Sequence[int]], prefix: SharedPrefix | None, pad_token_id: int, device: torch.device
) -> dict[str, Any]:
    """Model inputs for one batch: the prompts after the shared prefix with its cache, or whole prompts."""
    if prefix is not None:
        suffixes = left_pad([ids[prefix.length :] for ids in rows], pad_token_id)
        if prefix.fits(suffixes.input_ids.shape[1]):
            prefix_mask = torch.ones((len(rows), prefix.length), dtype=torch.long)
            return {
                "input_ids": suffixes.input_ids.to(device),
                "attention_mask": torch.cat([prefix_mask, suffixes.attention_mask], dim=1).to(device),
                "position_ids": (suffixes.position_ids + prefix.length).to(device),
                prefix.argument_name: prefix.cache_for_batch(len(rows)),
                "use_cache": True,
            }
    return {**left_pad(rows, pad_token_id).to(device).model_inputs(), "use_cache": False}


def measure_last_token_residuals(
    model: PreTrainedModel,
    token_id_lists: Sequence[Sequence[int]],
    batch_size: int,
    pad_token_id: int,
    description: str = "prompts",
    share_prefix: bool = True,
) -> ResidualStatistics:
    """Mean and variance of the last-prompt-token residual entering each layer L = 0..N.

    `batch_size` 0 picks the largest batch that fits (an estimate, halved on out-of-memory).
    `share_prefix` computes the tokens all prompts start with once (exact; see the module notes).
    """
    if not token_id_lists:
        raise ValueError("no prompts to measure")
    layers = decoder_layers(model)
    device = input_device(model)
    sizer = BatchSizer.for_prompts(batch_size, model, token_id_lists)
    # The base model stops after the final norm: the output head's logits are never computed.
    forward = model.base_model
    accumulator = WelfordAccumulator()
    with (
        LastTokenCapture(layers) as capture,
        torch.inference_mode(),
        tqdm(total=len(token_id_lists), desc=description, unit="prompt", dynamic_ncols=True) as progress,
    ):
        prefix = compute_shared_prefix(model, capture, token_id_lists) if share_prefix else None

        def run_batch(indices: list[int]) -> torch.Tensor:
            forward(
                **batch_inputs([token_id_lists[index] for index in indices], prefix, pad_token_id, device)
            )
            return capture.take()

        for indices, residuals in run_in_batches(
            token_id_lists,
            sizer,
            run_batch,
            device,
            abandoned=lambda indices: capture.clear(),
            resized=lambda size: progress.set_postfix(batch_size=size),
        ):
            accumulator.add(residuals)
            progress.update(len(indices))
    return accumulator.statistics()
