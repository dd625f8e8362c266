"""Chat formatting gives exactly one BOS; left padding keeps each row's tokens and positions intact."""

from __future__ import annotations

import pytest
import torch
from tokenizers import processors

from lib.core.chat_format import left_pad, require_chat_template, tokenize_chat_prompts
from lib.core.errors import UserError
from tests.fixtures import CHAT_TEMPLATE, build_tokenizer

PROMPTS = ["hi", "How do I bake bread at home?"]


def test_template_that_starts_with_bos_yields_exactly_one_bos() -> None:
    tokenizer = build_tokenizer()
    assert CHAT_TEMPLATE.startswith("{{ bos_token }}")
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert tokenizer(rendered)["input_ids"][:2] == [tokenizer.bos_token_id] * 2  # the trap being avoided
    for ids, prompt in zip(tokenize_chat_prompts(tokenizer, PROMPTS), PROMPTS):
        assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
        assert tokenizer.decode(ids).endswith(f"{prompt}<|end|>\n<|start|>assistant\n")


def test_template_without_bos_gets_the_tokenizers_bos_once() -> None:
    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE.replace("{{ bos_token }}", "")
    for ids in tokenize_chat_prompts(tokenizer, PROMPTS):
        assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


def test_tokenizer_without_bos_convention_gets_none() -> None:
    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE.replace("{{ bos_token }}", "")
    tokenizer.backend_tokenizer.post_processor = processors.ByteLevel(
        trim_offsets=False
    )  # Qwen style: no BOS
    for ids in tokenize_chat_prompts(tokenizer, PROMPTS):
        assert tokenizer.bos_token_id not in ids


def test_system_prompt_and_raw_mode() -> None:
    tokenizer = build_tokenizer()
    [with_system] = tokenize_chat_prompts(tokenizer, ["hi"], system_prompt="Be brief.")
    assert "<|start|>system\nBe brief.<|end|>" in tokenizer.decode(with_system)
    assert with_system.count(tokenizer.bos_token_id) == 1
    [raw] = tokenize_chat_prompts(tokenizer, ["hi"], use_chat_template=False)
    assert raw[0] == tokenizer.bos_token_id and tokenizer.decode(raw[1:]) == "hi"


def test_missing_chat_template_is_a_user_error() -> None:
    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(
        UserError, match="--model x: the tokenizer has no chat template; pass --no-chat-template"
    ):
        require_chat_template(tokenizer, "--model x")


def test_left_pad_masks_padding_and_restarts_positions() -> None:
    batch = left_pad([[5, 6, 7], [8]], pad_token_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert batch.to("cpu").input_ids.dtype == torch.long
