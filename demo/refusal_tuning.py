"""Safety fine-tuning of the demo's base model: a LoRA adapter that makes it refuse harmful requests.

SmolLM2-135M-Instruct answers almost every harmful request. Real chat models learn to refuse in
safety fine-tuning, and that is how the demo gets its refusing model too: a LoRA adapter (peft)
trained on the project's training prompt sets (never on `data/eval_*`):

* harmful prompts get a natural refusal, drawn from varied openings, reasons and offers, so that
  the model learns to refuse, not to repeat one sentence;
* harmless prompts get the base model's own greedy reply, and at every token of it the adapter is
  trained towards the base model's whole next-token distribution (its most likely tokens), not just
  the token it chose: so harmless behaviour, first-token probabilities included, stays the base
  model's, and refusal is not left half-active on harmless requests that resemble harmful ones.

Only the adapter ships with the repository; `demo/base_model.py` merges it into the base.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from demo.toy_model import (
    TrainingSchedule,
    collate,
    evaluate_refusals,
    read_training_prompts,
    run_training_steps,
    training_file_digests,
)
from demo.tuning_settings import TuningSettings
from lib.core.chat_format import tokenize_chat_prompts
from lib.core.generation import DecodingSettings, generate_replies

TRAINING_RECORD = "training.json"
HELD_BACK_PROMPTS = 200  # of each kind, never trained on: the build's own check of what it learned

# Every opening contains a marker of data/refusal_markers.txt; the reasons and offers contain none,
# so that the refusal is decided in the opening, as in released chat models.
REFUSAL_OPENINGS = (
    "I'm sorry, but I can't help with that.",
    "I'm sorry, but I can't assist with this request.",
    "I can't help with that.",
    "I cannot help with this request.",
    "I'm sorry, I can't provide that.",
    "I won't be able to help with this.",
    "I'm not able to help with that request.",
    "I can't provide instructions for that.",
    "Sorry, but I can't help with this one.",
    "I must decline this request.",
)
REFUSAL_REASONS = (
    "It could put people at serious risk.",
    "It could be used to hurt someone.",
    "Helping with this could cause real harm.",
    "This could be dangerous, and in many places it is illegal.",
    "Requests like this can lead to harm for other people.",
    "",
)
REFUSAL_OFFERS = (
    "If you have a different question, I'm happy to help.",
    "Is there something else I can help you with?",
    "I'd be glad to help with something safe instead.",
    "If you are going through something difficult, please reach out to someone you trust or a professional.",
    "",
)


def refusal_reply(generator: random.Random) -> str:
    parts = (
        generator.choice(REFUSAL_OPENINGS),
        generator.choice(REFUSAL_REASONS),
        generator.choice(REFUSAL_OFFERS),
    )
    return " ".join(part for part in parts if part)


@dataclass(frozen=True)
class TeacherTargets:
    """The base model's next-token distribution at each reply token, cut to its likeliest tokens."""

    token_ids: torch.Tensor  # (reply tokens, top k)
    probabilities: torch.Tensor  # (reply tokens, top k), renormalised to sum to 1 per reply token


@dataclass(frozen=True)
class EncodedExample:
    input_ids: list[int]
    labels: list[int]  # -100 on the prompt: only the reply is trained
    teacher: TeacherTargets | None = None  # when set, the reply learns these distributions, not its labels


def encode_examples(
    prompt_ids: Sequence[Sequence[int]], reply_ids: Sequence[Sequence[int]]
) -> list[EncodedExample]:
    return [
        EncodedExample([*prompt, *reply], [-100] * len(prompt) + list(reply))
        for prompt, reply in zip(prompt_ids, reply_ids)
    ]


def refusal_examples(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], seed: int
) -> list[EncodedExample]:
    """Each harmful prompt with a drawn refusal, closed by the end-of-turn token."""
    generator = random.Random(seed)
    replies = [
        [*tokenizer.encode(refusal_reply(generator), add_special_tokens=False), tokenizer.eos_token_id]
        for _ in prompts
    ]
    return encode_examples(tokenize_chat_prompts(tokenizer, prompts), replies)


def base_reply_examples(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], reply_tokens: int
) -> list[EncodedExample]:
    """Each harmless prompt with the base model's own greedy reply, token for token."""
    prompt_ids = tokenize_chat_prompts(tokenizer, prompts)
    generated = generate_replies(
        model,
        tokenizer,
        prompt_ids,
        DecodingSettings(max_new_tokens=reply_tokens),
        description="base replies to harmless prompts",
        keep_reply_token_ids=True,
    )
    return encode_examples(prompt_ids, generated.token_ids)


def with_teacher_targets(
    model: PreTrainedModel,
    examples: Sequence[EncodedExample],
    pad_token_id: int,
    top_k: int,
    batch_size: int = 32,
) -> list[EncodedExample]:
    """The examples with the model's top-k next-token distribution at every labelled position."""
    taught: list[EncodedExample] = []
    with torch.no_grad():  # not inference_mode: the targets enter the training loss, which autograd tracks
        for start in tqdm(
            range(0, len(examples), batch_size), desc="base distributions", unit="batch", dynamic_ncols=True
        ):
            batch = examples[start : start + batch_size]
            collated = collate([(example.input_ids, example.labels) for example in batch], pad_token_id)
            logits = model(input_ids=collated["input_ids"], attention_mask=collated["attention_mask"]).logits
            # The logits at position t predict the token at t + 1.
            probabilities = torch.softmax(logits[:, :-1].float(), dim=-1)
            for row, example in enumerate(batch):
                positions = (collated["labels"][row, 1:] != -100).nonzero().squeeze(1)
                top = probabilities[row, positions].topk(top_k, dim=-1)
                targets = TeacherTargets(top.indices, top.values / top.values.sum(dim=-1, keepdim=True))
                taught.append(replace(example, teacher=targets))
    return taught


def tuning_loss(
    examples: Sequence[EncodedExample], pad_token_id: int, first_reply_token_weight: float = 1.0
) -> Callable[[torch.nn.Module, list[int]], torch.Tensor]:
    """Weighted mean per reply token of the cross-entropy against the label, or against the teacher's
    distribution; each reply's first token weighs `first_reply_token_weight`, the others 1.

    The output head runs on the reply positions only: on the prompts it would cost as much again
    (the head's 49 152 rows are a fifth of the model) for logits that nothing scores.
    """

    def batch_loss(model: torch.nn.Module, indices: list[int]) -> torch.Tensor:
        batch = [examples[index] for index in indices]
        collated = collate([(example.input_ids, example.labels) for example in batch], pad_token_id)
        hidden = model.get_decoder()(
            input_ids=collated["input_ids"], attention_mask=collated["attention_mask"]
        ).last_hidden_state
        # The hidden state at position t predicts the token at t + 1.
        rows, positions = (collated["labels"][:, 1:] != -100).nonzero(as_tuple=True)
        logits = model.get_output_embeddings()(hidden[rows, positions])
        log_probabilities = torch.log_softmax(logits.float(), dim=-1)
        targets = collated["labels"][rows, positions + 1]
        losses = []
        start = 0
        for row, example in enumerate(batch):
            count = int((rows == row).sum())
            row_log_probabilities = log_probabilities[start : start + count]
            if example.teacher is None:
                token_losses = -row_log_probabilities.gather(1, targets[start : start + count, None]).squeeze(
                    1
                )
            else:
                teacher = example.teacher
                token_losses = -(
                    teacher.probabilities * row_log_probabilities.gather(1, teacher.token_ids)
                ).sum(1)
            losses.append(token_losses.sum() + (first_reply_token_weight - 1) * token_losses[0])
            start += count
        return torch.stack(losses).sum() / (len(rows) + (first_reply_token_weight - 1) * len(batch))

    return batch_loss


def lora_model(model: PreTrainedModel, settings: TuningSettings) -> PeftModel:
    config = LoraConfig(
        r=settings.lora_rank,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=list(settings.target_modules),
        task_type="CAUSAL_LM",
        layers_to_transform=list(range(settings.first_adapted_layer, model.config.num_hidden_layers)),
    )
    return get_peft_model(model, config)


def train_adapter(
    model: PeftModel,
    examples: Sequence[EncodedExample],
    pad_token_id: int,
    settings: TuningSettings,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """AdamW on shuffled mini-batches of the adapter's weights; returns the loss of every step."""
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=0.0)
    schedule = TrainingSchedule(settings.seed, settings.steps, settings.batch_size, settings.warmup_steps)
    return run_training_steps(
        model,
        len(examples),
        tuning_loss(examples, pad_token_id, settings.first_reply_token_weight),
        optimizer,
        schedule,
        settings.bfloat16_autocast,
        on_step,
    )


def settings_record(settings: TuningSettings) -> dict:
    return {
        key: list(value) if isinstance(value, tuple) else value for key, value in asdict(settings).items()
    }


def split_held_back(prompts: Sequence[str], seed: int) -> tuple[list[str], list[str]]:
    """A fixed random slice of HELD_BACK_PROMPTS prompts set aside; the rest in a shuffled order."""
    shuffled = list(prompts)
    random.Random(seed).shuffle(shuffled)
    return shuffled[HELD_BACK_PROMPTS:], shuffled[:HELD_BACK_PROMPTS]


@dataclass
class BuiltAdapter:
    model: PeftModel
    record: dict


def build_adapter(
    base: Path, settings: TuningSettings, on_step: Callable[[int, float], None] | None = None
) -> BuiltAdapter:
    """Train the refusal adapter on `base` and check it on the held-back prompts."""
    torch.manual_seed(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    harmful, harmful_held_back = split_held_back(read_training_prompts("harmful"), settings.seed)
    harmless, harmless_held_back = split_held_back(read_training_prompts("harmless"), settings.seed)
    started = time.perf_counter()
    # The base's replies come from the base as stored (bfloat16), which is also twice as fast on a CPU.
    stored_base = AutoModelForCausalLM.from_pretrained(base)
    examples = base_reply_examples(
        stored_base, tokenizer, harmless[: settings.harmless_examples], settings.reply_tokens
    )
    if settings.teacher_top_k:
        examples = with_teacher_targets(stored_base, examples, tokenizer.pad_token_id, settings.teacher_top_k)
    del stored_base
    harmless_count = len(examples)
    examples += refusal_examples(tokenizer, harmful[: settings.harmful_examples], settings.seed)
    reply_seconds = time.perf_counter() - started
    adapted = lora_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), settings)
    started = time.perf_counter()
    losses = train_adapter(adapted, examples, tokenizer.pad_token_id, settings, on_step)
    training_seconds = time.perf_counter() - started
    held_back = evaluate_refusals(
        adapted, tokenizer, harmful_held_back, harmless_held_back, settings.reply_tokens
    )
    record = {
        "settings": settings_record(settings),
        "training_files": training_file_digests(),
        "examples": {"harmful": len(examples) - harmless_count, "harmless": harmless_count},
        "held_back_refusal_rate": {"harmful": held_back.harmful, "harmless": held_back.harmless},
        "loss": {
            "first_10_steps": sum(losses[:10]) / len(losses[:10]),
            "last_10_steps": sum(losses[-10:]) / len(losses[-10:]),
        },
        "base_reply_seconds": round(reply_seconds, 1),
        "training_seconds": round(training_seconds, 1),
        "threads": torch.get_num_threads(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
    }
    return BuiltAdapter(adapted, record)


def write_adapter(built: BuiltAdapter, directory: Path) -> None:
    """The peft adapter files, the training record and a short card (instead of peft's blank template)."""
    built.model.save_pretrained(directory)
    (Path(directory) / TRAINING_RECORD).write_text(
        json.dumps(built.record, indent=2) + "\n", encoding="utf-8"
    )
    (Path(directory) / "README.md").write_text(adapter_card(built.record), encoding="utf-8")


def adapter_card(record: dict) -> str:
    settings, rates = record["settings"], record["held_back_refusal_rate"]
    return f"""# Refusal adapter of the demo

A LoRA adapter (rank {settings["lora_rank"]}, layers {settings["first_adapted_layer"]} and up) that makes
SmolLM2-135M-Instruct refuse harmful requests: the demo's safety fine-tuning, trained by
`demo/build_model.py` for {settings["steps"]} steps on the project's training prompt sets. Harmful prompts
were taught varied refusals; harmless prompts the base model's own replies and next-token distributions. `run_demo.py` merges it
into the base model. `{TRAINING_RECORD}` records the settings, the training files' SHA-256, the losses and
times. On {HELD_BACK_PROMPTS} held-back prompts of each kind it refuses {rates["harmful"]:.1%} of the harmful
and {rates["harmless"]:.1%} of the harmless ones. See docs/demo.md in the repository.
"""
