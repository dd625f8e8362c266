"""Generate replies: batched with left padding for evaluation, streamed one at a time for chat.

Decoding is greedy unless a temperature above 0 is given; then it samples with that temperature
and nucleus (top-p) filtering, and the model's own top-k is switched off so that `--temperature`
and `--top-p` alone decide. Everything else in the model's `generation_config.json` (end-of-turn
tokens, a repetition penalty, ...) applies as its authors set it.

Batches hold prompts of similar length (longest first, sized and retried by lib/core/batching.py)
padded on the left with explicit position ids (lib.core.chat_format.left_pad), which generate() extends
token by token, so each reply is the one the prompt would get alone. The logits of the first reply
token, which the evaluation's KL divergence needs, are taken from generate()'s own first forward
pass (the whole prompt), not from a second pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase, TextStreamer
from transformers.generation.streamers import BaseStreamer

from lib.core.batching import BatchSizer, run_in_batches
from lib.core.chat_format import left_pad, pad_token_id_of
from lib.core.loading import input_device


@dataclass(frozen=True)
class DecodingSettings:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def generation_config(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, settings: DecodingSettings
) -> GenerationConfig:
    """The settings for generate(); unset values come from the model's generation_config.json."""
    values: dict[str, Any] = {
        "max_new_tokens": settings.max_new_tokens,
        "pad_token_id": pad_token_id_of(tokenizer),
        "do_sample": not settings.greedy,
    }
    if not settings.greedy:
        values.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
    if model.generation_config.eos_token_id is None and tokenizer.eos_token_id is not None:
        values["eos_token_id"] = tokenizer.eos_token_id
    return GenerationConfig(**values)


def end_token_ids(model: PreTrainedModel, config: GenerationConfig) -> set[int]:
    """The token ids that end a reply (generate() pads a finished row after one of them)."""
    ids = config.eos_token_id if config.eos_token_id is not None else model.generation_config.eos_token_id
    if ids is None:
        return set()
    return {int(ids)} if isinstance(ids, int) else {int(token) for token in ids}


def reply_token_ids(new_token_ids: Sequence[int], end_ids: set[int]) -> list[int]:
    """The generated tokens up to and including the first end token (the padding after it dropped)."""
    kept: list[int] = []
    for token in new_token_ids:
        kept.append(int(token))
        if int(token) in end_ids:
            break
    return kept


def reply_text(tokenizer: PreTrainedTokenizerBase, new_token_ids: Sequence[int], end_ids: set[int]) -> str:
    """The decoded reply: up to its first end token, special tokens dropped, outer whitespace trimmed."""
    kept = [token for token in reply_token_ids(new_token_ids, end_ids) if token not in end_ids]
    return tokenizer.decode(kept, skip_special_tokens=True).strip()


class FirstForwardLogits:
    """Keep the last-position logits of a model's first forward call inside the `with` block.

    In generate() that first call runs the whole prompt, so its last position holds the logits of
    the reply's first token, exactly as the model computed them (after any final soft-capping).
    """

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.logits: torch.Tensor | None = None
        self.handle: Any = None

    def __enter__(self) -> FirstForwardLogits:
        self.handle = self.model.register_forward_hook(self._keep_first)
        return self

    def __exit__(self, *exception: object) -> None:
        self.handle.remove()

    def _keep_first(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        if self.logits is None:
            self.logits = output.logits[:, -1, :].detach().clone()

    def captured(self) -> torch.Tensor:
        if self.logits is None:
            raise RuntimeError(f"{type(self.model).__name__} ran no forward pass: no first-token logits")
        return self.logits


def first_token_log_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities over the full vocabulary, in float64 on the CPU (logits: [batch, vocab])."""
    return torch.log_softmax(logits.to(torch.float64), dim=-1).cpu()


class StepProgress(BaseStreamer):
    """Advance a progress bar counted in decoding steps times rows, so that it moves (and tqdm can show an
    ETA) within a batch, even when one batch holds every prompt.

    generate() hands over the prompts once, then the new tokens of every decoding step: each step
    advances the bar by the batch's rows. A batch whose rows all ended early adds its remaining
    steps at its end(), so that every batch advances the bar by rows x max_new_tokens in all.
    `start_batch` starts the count of each batch.
    """

    def __init__(self, progress: tqdm, max_new_tokens: int) -> None:
        self.progress = progress
        self.max_new_tokens = max_new_tokens
        self.start_batch(0)

    def start_batch(self, rows: int) -> None:
        self.rows = rows
        self.prompts_seen = False
        self.steps_shown = 0

    def put(self, value: torch.Tensor) -> None:
        if not self.prompts_seen:
            self.prompts_seen = True
        elif self.steps_shown < self.max_new_tokens:
            self._advance(1)

    def end(self) -> None:
        self._advance(self.max_new_tokens - self.steps_shown)

    def withdraw(self) -> None:
        """Take back what a batch that was abandoned (out of memory) advanced the bar by."""
        self._advance(-self.steps_shown)

    def _advance(self, steps: int) -> None:
        self.steps_shown += steps
        self.progress.update(steps * self.rows)


def prompts_done_postfix(done: int, total: int, batch_rows: int | None = None) -> str:
    """The bar's postfix: the prompts whose replies are done, and the size of the batch in progress."""
    batch = f", batch of {batch_rows}" if batch_rows is not None else ""
    return f"{done}/{total} prompts done{batch}"


@dataclass(frozen=True)
class GeneratedReplies:
    replies: list[str]  # in the order of the prompts given
    first_token_log_probabilities: torch.Tensor | None  # [prompts, vocab] float64 on the CPU, if asked
    token_ids: list[list[int]] | None = None  # each reply's tokens, its end token included, if asked


def generate_replies(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    token_id_lists: Sequence[Sequence[int]],
    settings: DecodingSettings,
    batch_size: int = 0,
    description: str = "replies",
    keep_first_token_log_probabilities: bool = False,
    keep_reply_token_ids: bool = False,
    show_progress: bool = True,
) -> GeneratedReplies:
    """Generate a reply to each tokenised prompt, in batches of similar length padded on the left.

    `batch_size` 0 starts from the largest batch the free memory should hold and halves it on an
    out-of-memory error; a fixed size that runs out of memory stops with advice.
    """
    if not token_id_lists:
        raise ValueError("no prompts to generate replies to")
    config = generation_config(model, tokenizer, settings)
    end_ids = end_token_ids(model, config)
    device = input_device(model)
    sizer = BatchSizer.for_prompts(batch_size, model, token_id_lists, added_tokens=settings.max_new_tokens)
    replies: dict[int, str] = {}
    token_ids: dict[int, list[int]] = {}
    log_probabilities: dict[int, torch.Tensor] = {}
    count = len(token_id_lists)
    total_steps = count * settings.max_new_tokens
    with (
        torch.inference_mode(),
        tqdm(
            total=total_steps, desc=description, unit="token", dynamic_ncols=True, disable=not show_progress
        ) as progress,
    ):
        steps = StepProgress(progress, settings.max_new_tokens)

        def starting(done: int, indices: list[int]) -> None:
            progress.set_postfix_str(prompts_done_postfix(done, count, len(indices)), refresh=False)
            steps.start_batch(len(indices))

        def run_batch(indices: list[int]) -> tuple[torch.Tensor, FirstForwardLogits]:
            batch = left_pad([token_id_lists[index] for index in indices], config.pad_token_id).to(device)
            with FirstForwardLogits(model) as first:
                sequences = model.generate(**batch.model_inputs(), generation_config=config, streamer=steps)
            return sequences[:, batch.input_ids.shape[1] :].cpu(), first

        for indices, (new_tokens, first) in run_in_batches(
            token_id_lists,
            sizer,
            run_batch,
            device,
            starting=starting,
            abandoned=lambda indices: steps.withdraw(),
        ):
            for row, index in enumerate(indices):
                replies[index] = reply_text(tokenizer, new_tokens[row].tolist(), end_ids)
                if keep_reply_token_ids:
                    token_ids[index] = reply_token_ids(new_tokens[row].tolist(), end_ids)
            if keep_first_token_log_probabilities:
                batch_log_probabilities = first_token_log_probabilities(first.captured())
                log_probabilities.update(zip(indices, batch_log_probabilities))
        progress.set_postfix_str(prompts_done_postfix(count, count))
    in_order = range(count)
    return GeneratedReplies(
        [replies[index] for index in in_order],
        torch.stack([log_probabilities[index] for index in in_order]) if log_probabilities else None,
        [token_ids[index] for index in in_order] if keep_reply_token_ids else None,
    )


def stream_reply(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    token_ids: Sequence[int],
    settings: DecodingSettings,
) -> str:
    """Generate one reply, printing its text to stdout as the tokens arrive; return the whole reply."""
    config = generation_config(model, tokenizer, settings)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    inputs = left_pad([token_ids], config.pad_token_id).to(input_device(model))
    with torch.inference_mode():
        sequences = model.generate(**inputs.model_inputs(), generation_config=config, streamer=streamer)
    return reply_text(
        tokenizer, sequences[0, inputs.input_ids.shape[1] :].tolist(), end_token_ids(model, config)
    )
