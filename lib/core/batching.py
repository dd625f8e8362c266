"""Prompts in batches of similar length, sized to fit memory: measure's residual capture and generation.

Prompts run longest first, so a batch size that fits the first batch fits them all and neighbours
pad little. The size is either fixed (`--batch-size N`: an out-of-memory error stops with advice)
or automatic (`--batch-size 0`: an estimate from the free memory, halved on every out-of-memory
error, the failed batch retried). `run_in_batches` is that loop; the caller passes what one batch
does and, for its progress display, what to show when a batch starts, is abandoned or shrinks.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch
from transformers import PreTrainedModel

from lib.core.errors import UserError
from lib.core.loading import cpu_available_bytes, input_device, text_config

AUTOMATIC_BATCH_SIZE_LIMIT = 256
# Share of the free memory the activations of one automatic-size batch may plan to use.
AUTOMATIC_BATCH_MEMORY_FRACTION = 0.5
OUT_OF_MEMORY_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory")

Result = TypeVar("Result")


def length_sorted_order(token_id_lists: Sequence[Sequence[int]]) -> list[int]:
    """Prompt indices, longest first: neighbours have similar lengths, so padding wastes little."""
    return sorted(range(len(token_id_lists)), key=lambda index: len(token_id_lists[index]), reverse=True)


def activation_bytes_per_sequence(model: PreTrainedModel, length: int) -> int:
    """A generous estimate of one sequence's peak transient activations inside one decoder layer."""
    config = text_config(model.config)
    hidden = config.hidden_size
    heads = getattr(config, "num_attention_heads", 1) or 1
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    key_value_heads = getattr(config, "num_key_value_heads", None) or heads
    experts_per_token = getattr(config, "num_experts_per_tok", None) or 1
    intermediate = max(
        getattr(config, "intermediate_size", 0) or 0,
        (getattr(config, "moe_intermediate_size", 0) or 0) * experts_per_token,
        hidden,
    )
    element_size = max(
        next(model.parameters()).element_size(), 2
    )  # quantised weights still compute in >= 16 bit
    per_token = element_size * (8 * hidden + 4 * intermediate + 2 * head_dim * (heads + 2 * key_value_heads))
    # keys and values of every layer, kept for one forward pass (measure's shared prefix, generate()'s cache)
    per_token += element_size * 2 * key_value_heads * head_dim * config.num_hidden_layers
    attention_scores = 4 * heads * length  # one float32 score row per head (eager attention's worst case)
    return length * (per_token + attention_scores)


def free_memory_near(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return cpu_available_bytes()


def automatic_batch_size(model: PreTrainedModel, longest_prompt: int, prompt_count: int) -> int:
    """The starting size for `--batch-size 0`: as many longest prompts as half the free memory holds."""
    budget = free_memory_near(input_device(model)) * AUTOMATIC_BATCH_MEMORY_FRACTION
    fitting = int(budget // activation_bytes_per_sequence(model, longest_prompt))
    return max(1, min(fitting, prompt_count, AUTOMATIC_BATCH_SIZE_LIMIT))


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(
        text in str(error).lower() for text in OUT_OF_MEMORY_MESSAGES
    )


class BatchSizer:
    """The batch size in use: fixed as requested, or automatic (start from an estimate, halve on OOM).

    `longest_prompt` counts every token a sequence will hold (for generation, the reply's too).
    """

    def __init__(
        self, requested: int, model: PreTrainedModel, longest_prompt: int, prompt_count: int
    ) -> None:
        self.automatic = requested == 0
        self.size = automatic_batch_size(model, longest_prompt, prompt_count) if self.automatic else requested

    @classmethod
    def for_prompts(
        cls,
        requested: int,
        model: PreTrainedModel,
        token_id_lists: Sequence[Sequence[int]],
        added_tokens: int = 0,
    ) -> BatchSizer:
        """The sizer for these prompts, each growing by `added_tokens` (a reply's) while it runs."""
        longest = max(len(token_ids) for token_ids in token_id_lists) + added_tokens
        return cls(requested, model, longest, len(token_id_lists))

    def shrink_after_out_of_memory(self) -> None:
        if not self.automatic:
            raise UserError(
                f"--batch-size {self.size}: out of memory; use a smaller --batch-size, or 0 to find one"
            )
        if self.size == 1:
            raise UserError(
                "out of memory with one prompt per batch; load the model in less memory "
                "(quantisation, or another --device-map)"
            )
        self.size = max(1, self.size // 2)


def release_cached_memory(device: torch.device | None = None) -> None:
    """Collect what was just dropped (a failed batch, a model) and hand a GPU's cached blocks back.

    `device`: the device that ran out of memory; only a CUDA device has a cache to empty. None: the
    GPU's, wherever one is available (after a model was released).
    """
    gc.collect()
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        torch.cuda.empty_cache()


def _ignore(*arguments: object) -> None:
    return None


def run_in_batches(
    token_id_lists: Sequence[Sequence[int]],
    sizer: BatchSizer,
    run_batch: Callable[[list[int]], Result],
    device: torch.device,
    *,
    starting: Callable[[int, list[int]], None] = _ignore,
    abandoned: Callable[[list[int]], None] = _ignore,
    resized: Callable[[int], None] = _ignore,
) -> Iterator[tuple[list[int], Result]]:
    """Run `run_batch` on the prompts' indices in batches of `sizer.size`, longest prompts first; yield
    (indices, result) for every batch that ran.

    An out-of-memory error inside `run_batch` abandons the batch: `abandoned(indices)` undoes what it
    showed, the sizer shrinks (or stops with advice), the cached memory goes back and the same
    prompts run again in a smaller batch, announced by `resized(new size)`. `starting(done, indices)`
    runs before every try, with the count of prompts whose batches are done.
    """
    order = length_sorted_order(token_id_lists)
    done = 0
    while done < len(order):
        indices = list(order[done : done + sizer.size])
        starting(done, indices)
        try:
            result = run_batch(indices)
        except RuntimeError as error:  # torch.OutOfMemoryError is a RuntimeError
            if not is_out_of_memory(error):
                raise
        else:
            yield indices, result
            done += len(indices)
            continue
        # Outside the except block: the error's traceback, and the tensors its frames hold, are gone.
        abandoned(indices)
        sizer.shrink_after_out_of_memory()
        release_cached_memory(device)
        resized(sizer.size)
