"""Direct references for the chat and evaluate tests: transformers' own generate() and forward pass,
one prompt at a time without padding, on the fixtures' chat template (which writes BOS itself)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase


@lru_cache(maxsize=4)
def load_reference(model_directory: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model = AutoModelForCausalLM.from_pretrained(model_directory, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_directory)


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> torch.Tensor:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


def reference_greedy_reply(model_directory: Path, messages: list[dict[str, str]], max_new_tokens: int) -> str:
    """The greedy reply by transformers' generate() for this conversation alone, up to the first EOS."""
    _, tokenizer = load_reference(model_directory)
    return _greedy_reply(model_directory, _prompt_ids(tokenizer, messages), max_new_tokens)


def reference_greedy_continuation(model_directory: Path, text: str, max_new_tokens: int) -> str:
    """The greedy continuation of raw `text` (no chat template; the tokenizer's own BOS)."""
    _, tokenizer = load_reference(model_directory)
    return _greedy_reply(model_directory, tokenizer(text, return_tensors="pt")["input_ids"], max_new_tokens)


def _greedy_reply(model_directory: Path, input_ids: torch.Tensor, max_new_tokens: int) -> str:
    model, tokenizer = load_reference(model_directory)
    with torch.inference_mode():
        sequences = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
    new_tokens = sequences[0, input_ids.shape[1] :].tolist()
    if tokenizer.eos_token_id in new_tokens:
        new_tokens = new_tokens[: new_tokens.index(tokenizer.eos_token_id)]
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def reference_first_token_log_probabilities(model_directory: Path, prompt: str) -> torch.Tensor:
    """log-softmax in float64 of the logits at the last prompt position, from one unpadded forward pass."""
    model, tokenizer = load_reference(model_directory)
    with torch.inference_mode():
        logits = model(_prompt_ids(tokenizer, [{"role": "user", "content": prompt}])).logits[0, -1]
    return torch.log_softmax(logits.to(torch.float64), dim=-1)
