"""The settings of the demo adapter's safety fine-tuning (see demo/refusal_tuning.py), importable without torch.

demo/build_model.py's parser takes its defaults from `TuningSettings()` before torch loads;
demo/refusal_tuning.py, which trains the adapter, imports the class from here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TuningSettings:
    """Everything that determines the adapter; the same settings, data and torch build give the same weights."""

    seed: int = 0
    steps: int = 400
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_steps: int = 20
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    first_adapted_layer: int = 15  # LoRA on the upper layers only: backward stops there, which halves a step
    harmful_examples: int = 2000  # harmful prompts, each with a drawn refusal
    # More harmless prompts than harmful ones: the adapter sees more of what it must leave alone, so harmless
    # requests that share words with harmful ones are not pulled into refusing (their replies cost generation).
    harmless_examples: int = 5000
    bfloat16_autocast: bool = True  # CPU matrix products in bfloat16; the adapter's weights stay float32
    reply_tokens: int = 24  # length of the base model's replies that harmless prompts train on
    teacher_top_k: int = 32  # harmless replies learn the base's distribution over its k likeliest tokens
    # The first reply token decides between refusing and answering, and is what the demo's KL scores: it
    # weighs as this many of the reply's other tokens in the loss.
    first_reply_token_weight: float = 4.0
