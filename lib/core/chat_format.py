"""Turn prompts into token ids the way the model sees a chat turn, and pad batches on the left.

The chat template is rendered to text once and tokenised without the tokenizer's own special
tokens: many templates (Llama 3, Gemma, ...) already write BOS while the tokenizer's
post-processor would prepend another, and a doubled BOS shifts every activation. Where the
template does not write BOS but the tokenizer normally starts with one, BOS is added once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

# The flags are defined without torch (parsers build before it loads); re-exported from here.
from lib.core.cli_options import (  # noqa: F401
    NO_CHAT_TEMPLATE_FLAG,
    add_no_chat_template_argument,
    add_prompt_set_arguments,
)
from lib.core.errors import UserError


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def require_chat_template(tokenizer: PreTrainedTokenizerBase, model_flag_and_name: str) -> None:
    """Stop before any expensive work when the model has no chat template to format prompts with."""
    if not has_chat_template(tokenizer):
        raise UserError(
            f"{model_flag_and_name}: the tokenizer has no chat template; "
            f"pass {NO_CHAT_TEMPLATE_FLAG} to use the raw prompts instead"
        )


def chat_messages(prompt: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    """One user turn, preceded by a system turn when `system_prompt` is given."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    return [*messages, {"role": "user", "content": prompt}]


def render_chat_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], system_prompt: str | None = None
) -> list[str]:
    """The chat-templated text of each prompt, ending with the generation prompt (the reply's start)."""
    require_chat_template(tokenizer, "--model")
    try:
        return [
            tokenizer.apply_chat_template(
                chat_messages(prompt, system_prompt), tokenize=False, add_generation_prompt=True
            )
            for prompt in prompts
        ]
    except TemplateError as error:
        flag = "--system-prompt" if system_prompt is not None else "--model"
        raise UserError(f"{flag}: the model's chat template rejected the conversation ({error})") from None


def bos_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """`[bos_token_id]` when the tokenizer's ordinary encoding starts with BOS, else `[]`."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    plain = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if plain[:1] == [bos] else []


def tokenize_chat_prompts(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    system_prompt: str | None = None,
    use_chat_template: bool = True,
) -> list[list[int]]:
    """Token ids of each prompt as one chat turn awaiting the reply, with exactly one leading BOS.

    Without the chat template (`use_chat_template=False`) the raw prompt is tokenised with the
    tokenizer's own special tokens, and `system_prompt`, if any, is prepended as plain text.
    """
    if not use_chat_template:
        texts = [raw_text(chat_messages(prompt, system_prompt)) for prompt in prompts]
        return [list(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]
    texts = render_chat_prompts(tokenizer, prompts, system_prompt)
    prefix = bos_prefix(tokenizer)
    return [_with_one_bos(ids, prefix) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def raw_text(messages: Sequence[dict[str, str]]) -> str:
    """Messages without a chat template: their contents, separated by blank lines."""
    return "\n\n".join(message["content"] for message in messages)


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict[str, str]],
    system_flag: str = "--system",
    use_chat_template: bool = True,
) -> list[int]:
    """Token ids of a whole multi-turn conversation awaiting the assistant's next reply, one leading BOS.

    `system_flag` names the flag that set the system message, for a template that rejects it.
    Without the chat template the raw text of the messages is tokenised as `tokenize_chat_prompts` does.
    """
    if not use_chat_template:
        return list(tokenizer(raw_text(messages), add_special_tokens=True)["input_ids"])
    require_chat_template(tokenizer, "--model")
    try:
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    except TemplateError as error:
        flag = system_flag if any(message["role"] == "system" for message in messages) else "--model"
        raise UserError(f"{flag}: the model's chat template rejected the conversation ({error})") from None
    return _with_one_bos(tokenizer(text, add_special_tokens=False)["input_ids"], bos_prefix(tokenizer))


def _with_one_bos(ids: Sequence[int], prefix: list[int]) -> list[int]:
    ids = list(ids)
    return ids if ids[: len(prefix)] == prefix else prefix + ids


@dataclass(frozen=True)
class PaddedBatch:
    """A left-padded batch: every row's last column is its last prompt token."""

    input_ids: torch.Tensor  # [batch, length] long
    attention_mask: torch.Tensor  # [batch, length] long, 0 on padding
    position_ids: torch.Tensor  # [batch, length] long, counting from 0 at each row's first real token

    def to(self, device: torch.device | str) -> PaddedBatch:
        return PaddedBatch(
            *(
                tensor.to(device, non_blocking=True)
                for tensor in (self.input_ids, self.attention_mask, self.position_ids)
            )
        )

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
        }


def pad_token_id_of(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id used for padding; any id works since padding is masked, but a real pad token is preferred."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def left_pad(token_id_lists: Sequence[Sequence[int]], pad_token_id: int) -> PaddedBatch:
    """Collate prompts into one batch padded on the left, with the attention mask and position ids.

    Position ids restart at 0 on each row's first real token, so a prompt is encoded exactly as
    it would be alone, whatever its batch (the same positions `generate()` derives from the mask).
    """
    if not token_id_lists or any(len(ids) == 0 for ids in token_id_lists):
        raise ValueError("left_pad needs at least one prompt and no empty prompt")
    length = max(len(ids) for ids in token_id_lists)
    input_ids = torch.full((len(token_id_lists), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(token_id_lists), length), dtype=torch.long)
    for row, ids in enumerate(token_id_lists):
        input_ids[row, length - len(ids) :] = torch.as_tensor(list(ids), dtype=torch.long)
        attention_mask[row, length - len(ids) :] = 1
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return PaddedBatch(input_ids, attention_mask, position_ids)
