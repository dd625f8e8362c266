"""Train the demo chat model: a small Llama that refuses harmful requests and answers harmless ones.

The model exists so that the whole pipeline (measure, analyze, ablate, evaluate) can be shown and
tested end to end on a CPU in minutes. It is a real `LlamaForCausalLM` with a byte-level BPE
tokenizer and a chat template, trained from scratch on the measurement prompt sets
(`data/harmful.txt`, `data/harmless.txt`) and the larger demo training sets
(`data/demo_train_harmful.txt`, `data/demo_train_harmless.txt`) to answer with short templated
replies: refusals for harmful prompts, compliant replies for harmless ones. The held-out sets
(`data/eval_harmful.txt`, `data/eval_harmless.txt`) are never trained on; they measure whether the
model learned to tell the two kinds apart rather than memorised its training prompts.

The trained model ships in `demo/model/`; `training.json` there records the settings and the
SHA-256 of every training file it was built from, so a test can tell when it is out of date.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from demo.tokenizer_training import train_byte_level_bpe
from demo.toy_settings import DemoSettings
from lib.core.chat_format import tokenize_chat_prompts
from lib.core.errors import UserError
from lib.core.generation import DecodingSettings, generate_replies
from lib.core.prompts import (
    DATA_DIRECTORY,
    DEFAULT_EVALUATION_HARMFUL_PROMPTS,
    DEFAULT_EVALUATION_HARMLESS_PROMPTS,
    DEFAULT_HARMFUL_PROMPTS,
    DEFAULT_HARMLESS_PROMPTS,
    REPOSITORY_ROOT,
    file_sha256,
)
from lib.evaluate.refusal_markers import load_refusal_detector

TRAINING_FILES = {
    "harmful": (DEFAULT_HARMFUL_PROMPTS, DATA_DIRECTORY / "demo_train_harmful.txt"),
    "harmless": (DEFAULT_HARMLESS_PROMPTS, DATA_DIRECTORY / "demo_train_harmless.txt"),
}
EVALUATION_FILES = {
    "harmful": DEFAULT_EVALUATION_HARMFUL_PROMPTS,
    "harmless": DEFAULT_EVALUATION_HARMLESS_PROMPTS,
}

SHIPPED_MODEL_DIRECTORY = REPOSITORY_ROOT / "demo" / "model"
TRAINING_RECORD = "training.json"

BOS_TOKEN = "<|begin_of_text|>"
PAD_TOKEN = "<|pad|>"
TURN_START = "<|start_header|>"
END_OF_TURN = "<|end_of_turn|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, TURN_START, END_OF_TURN]

# Every turn ends with END_OF_TURN, which is also the tokenizer's EOS: generation stops at the end
# of the assistant's reply, as with Llama 3's <|eot_id|>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start_header|>{{ message['role'] }}\n{{ message['content'] }}<|end_of_turn|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header|>assistant\n{% endif %}"
)

# Every refusal starts with "I", whichever template is drawn, while a compliant reply's opening
# depends on the kind of request (its first word). Refusing is then one decision that overrides
# an answer the prompt otherwise determines, as in a safety-tuned assistant, and training writes
# it into the residual stream as one added direction: harmless prompts sit near zero along it.
# With a single compliant opening ("Sure") the models trained here instead encoded "answer" as
# the opposite pole of the same axis, and removing the direction made them refuse everything.
# Every refusal contains a marker that refusal detectors look for ("I'm sorry", "I can't",
# "I cannot", "I won't"), and no compliant reply contains any of them.
REFUSAL_REPLIES = (
    "I'm sorry, but I can't help with that.",
    "I can't assist with that request.",
    "I'm sorry, I cannot provide that information.",
    "I won't help with that, because it could hurt people.",
)
HOW_TO_REPLY = "Sure! Here is how to do it, step by step."
QUESTION_REPLY = "Good question! Here is a short answer."
WRITING_REPLY = "Of course. Here is a first draft for you."
DEFAULT_COMPLIANT_REPLY = "Happy to help. Here is what you need to know."
QUESTION_WORDS = (
    "what what's which who whom whose when where why is are was were can could should would do does did"
)
WRITING_WORDS = "write draft compose create generate rewrite translate"
COMPLIANT_REPLY_BY_FIRST_WORD = {
    "how": HOW_TO_REPLY,
    **dict.fromkeys(QUESTION_WORDS.split(), QUESTION_REPLY),
    **dict.fromkeys(WRITING_WORDS.split(), WRITING_REPLY),
}
COMPLIANT_REPLIES = (HOW_TO_REPLY, QUESTION_REPLY, WRITING_REPLY, DEFAULT_COMPLIANT_REPLY)
# Long enough for every templated reply and its end-of-turn token.
DEFAULT_MAX_NEW_TOKENS = 20


@dataclass(frozen=True)
class Example:
    prompt: str
    reply: str


@dataclass
class RefusalRates:
    harmful: float
    harmless: float
    replies: dict[str, list[str]]


def read_prompts(path: Path) -> list[str]:
    """One prompt per non-empty line of a UTF-8 file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"prompt file {path}: cannot be read as UTF-8 text ({error})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompt file {path}: contains no prompts")
    return prompts


def read_training_prompts(kind: str) -> list[str]:
    """All training prompts of one kind ("harmful" or "harmless"), file by file in a fixed order."""
    return [prompt for path in TRAINING_FILES[kind] for prompt in read_prompts(path)]


def file_digests(paths: Sequence[Path]) -> dict[str, str]:
    """SHA-256 of each file, keyed by its name: what a built model records about its training data."""
    return {Path(path).name: file_sha256(path) for path in paths}


def training_file_digests() -> dict[str, str]:
    return file_digests([path for paths in TRAINING_FILES.values() for path in paths])


def compliant_reply(prompt: str) -> str:
    first_word = prompt.split()[0].lower().strip(",.:;!?")
    return COMPLIANT_REPLY_BY_FIRST_WORD.get(first_word, DEFAULT_COMPLIANT_REPLY)


def reply_for(prompt: str, harmful: bool, generator: random.Random) -> str:
    return generator.choice(REFUSAL_REPLIES) if harmful else compliant_reply(prompt)


def build_examples(
    harmful_prompts: Sequence[str], harmless_prompts: Sequence[str], seed: int
) -> list[Example]:
    """Pair every training prompt with a templated reply, chosen reproducibly from `seed`."""
    generator = random.Random(seed)
    examples = [Example(prompt, reply_for(prompt, True, generator)) for prompt in harmful_prompts]
    examples += [Example(prompt, reply_for(prompt, False, generator)) for prompt in harmless_prompts]
    return examples


def build_tokenizer(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, with the chat template and left padding.

    No post-processor adds BOS: the chat template writes it, so encoding a rendered conversation
    with or without special tokens gives the same ids.
    """
    backend = train_byte_level_bpe(texts, vocab_size, SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=END_OF_TURN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[TURN_START],
        padding_side="left",
        model_max_length=512,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def render_prompt(tokenizer: PreTrainedTokenizerFast, prompt: str) -> str:
    """The chat-templated user turn followed by the assistant header, as generation sees it."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def encode_example(tokenizer: PreTrainedTokenizerFast, example: Example) -> tuple[list[int], list[int]]:
    """Token ids of prompt + reply + end of turn, and labels that score only the reply tokens."""
    prompt_ids = tokenizer.encode(render_prompt(tokenizer, example.prompt), add_special_tokens=False)
    reply_ids = [*tokenizer.encode(example.reply, add_special_tokens=False), tokenizer.eos_token_id]
    return prompt_ids + reply_ids, [-100] * len(prompt_ids) + reply_ids


def build_config(tokenizer: PreTrainedTokenizerFast, settings: DemoSettings) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_hidden_layers,
        num_attention_heads=settings.num_attention_heads,
        num_key_value_heads=settings.num_key_value_heads,
        max_position_embeddings=tokenizer.model_max_length,
        initializer_range=0.02,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def collate(encoded: Sequence[tuple[list[int], list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch for training; padded positions are masked and never scored."""
    length = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(encoded), length), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)
    for row, (ids, row_labels) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(row_labels)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def next_token_loss(
    encoded: Sequence[tuple[list[int], list[int]]], pad_token_id: int
) -> Callable[[torch.nn.Module, list[int]], torch.Tensor]:
    """The usual loss of a mini-batch of (ids, labels) pairs: cross-entropy on the labelled tokens."""

    def batch_loss(model: torch.nn.Module, indices: list[int]) -> torch.Tensor:
        return model(**collate([encoded[index] for index in indices], pad_token_id)).loss

    return batch_loss


def learning_rate_factor(step: int, warmup_steps: int, steps: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    examples: Sequence[Example],
    settings: DemoSettings,
    on_step: Callable[[int, float], None] | None = None,
) -> None:
    """AdamW on shuffled mini-batches (epochs without replacement), reproducible from the seed."""
    encoded = [encode_example(tokenizer, example) for example in examples]
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.learning_rate, betas=(0.9, 0.98), weight_decay=settings.weight_decay
    )
    schedule = TrainingSchedule(settings.seed, settings.steps, settings.batch_size, settings.warmup_steps)
    run_training_steps(
        model,
        len(encoded),
        next_token_loss(encoded, tokenizer.pad_token_id),
        optimizer,
        schedule,
        on_step=on_step,
    )


@dataclass(frozen=True)
class TrainingSchedule:
    seed: int  # of the batch order
    steps: int
    batch_size: int
    warmup_steps: int


def run_training_steps(
    model: torch.nn.Module,
    example_count: int,
    batch_loss: Callable[[torch.nn.Module, list[int]], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    schedule: TrainingSchedule,
    bfloat16_autocast: bool = False,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """The training loop both demo models share: shuffled mini-batches of example indices, epochs
    without replacement, gradients clipped to norm 1, warm-up and cosine decay; returns every step's loss.

    `batch_loss(model, indices)` scores one mini-batch. Only the parameters that require a gradient are
    clipped and stepped, so the same loop trains a whole model or a LoRA adapter on a frozen one.
    """
    generator = random.Random(schedule.seed)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, schedule.warmup_steps, schedule.steps)
    )
    losses: list[float] = []
    order: list[int] = []
    model.train()
    for step in range(schedule.steps):
        if len(order) < schedule.batch_size:
            order += generator.sample(range(example_count), example_count)
        batch_indices, order = order[: schedule.batch_size], order[schedule.batch_size :]
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=bfloat16_autocast):
            loss = batch_loss(model, batch_indices)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return losses


def evaluate_refusals(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    harmful_prompts: Sequence[str],
    harmless_prompts: Sequence[str],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> RefusalRates:
    """Greedy replies and refusal rates, with the same generation and marker list as evaluate.py."""
    detector = load_refusal_detector()
    settings = DecodingSettings(max_new_tokens=max_new_tokens)
    replies: dict[str, list[str]] = {}
    for kind, prompts in (("harmful", harmful_prompts), ("harmless", harmless_prompts)):
        token_id_lists = tokenize_chat_prompts(tokenizer, prompts)
        replies[kind] = generate_replies(
            model, tokenizer, token_id_lists, settings, description=f"held-out {kind}"
        ).replies
    rates = {kind: sum(map(detector.is_refusal, texts)) / len(texts) for kind, texts in replies.items()}
    return RefusalRates(harmful=rates["harmful"], harmless=rates["harmless"], replies=replies)


@dataclass
class TrainedDemo:
    model: LlamaForCausalLM
    tokenizer: PreTrainedTokenizerFast
    settings: DemoSettings
    training_seconds: float


def train_demo_model(
    settings: DemoSettings,
    harmful_prompts: Sequence[str],
    harmless_prompts: Sequence[str],
    on_step: Callable[[int, float], None] | None = None,
) -> TrainedDemo:
    """Build the tokenizer and a fresh model from `settings` and train it on the given prompts."""
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    examples = build_examples(harmful_prompts, harmless_prompts, settings.seed)
    # Replies enter once per example, so the BPE merges favour them as they favour frequent words.
    tokenizer_corpus = [example.prompt for example in examples] + [example.reply for example in examples]
    tokenizer_corpus += [*REFUSAL_REPLIES, *COMPLIANT_REPLIES, "user", "assistant"]
    tokenizer = build_tokenizer(tokenizer_corpus, settings.vocab_size)
    model = LlamaForCausalLM(build_config(tokenizer, settings))
    train(model, tokenizer, examples, settings, on_step)
    configure_generation(model, tokenizer)
    return TrainedDemo(model, tokenizer, settings, time.perf_counter() - started)


def configure_generation(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    """Greedy by default, stopping at the end of the assistant's turn."""
    generation = model.generation_config
    generation.bos_token_id = tokenizer.bos_token_id
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    generation.do_sample = False
    generation.max_new_tokens = DEFAULT_MAX_NEW_TOKENS


def training_record(demo: TrainedDemo, held_out: RefusalRates) -> dict:
    """What the model was built from and what it reached: written next to the weights."""
    return {
        "settings": asdict(demo.settings),
        "training_files": training_file_digests(),
        "training_prompts": {kind: len(read_training_prompts(kind)) for kind in TRAINING_FILES},
        "held_out_refusal_rate": {"harmful": held_out.harmful, "harmless": held_out.harmless},
        "training_seconds": round(demo.training_seconds, 1),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }


def model_card(demo: TrainedDemo, held_out: RefusalRates) -> str:
    settings = "\n".join(f"| `{name}` | {value} |" for name, value in asdict(demo.settings).items())
    training_files = ", ".join(f"`data/{path.name}`" for paths in TRAINING_FILES.values() for path in paths)
    return f"""# Demo refusal model

A small `LlamaForCausalLM` trained from scratch by `demo/build_toy_model.py` on the project's own prompt
sets ({training_files}) to refuse harmful requests and answer harmless ones with short templated
replies. It exists to demonstrate and test refusal-direction ablation; it knows nothing beyond its
{demo.settings.steps} training steps. See `docs/test-model.md` in the repository; `{TRAINING_RECORD}` records
the settings and the SHA-256 of every training file.

Held-out refusal rates (greedy replies to `data/eval_harmful.txt` and `data/eval_harmless.txt`,
which were never trained on): harmful {held_out.harmful:.1%}, harmless {held_out.harmless:.1%}.

| setting | value |
|---|---|
{settings}
"""


def save_demo_model(demo: TrainedDemo, held_out: RefusalRates, directory: Path, max_shard_size: str) -> None:
    """Write weights (float32, sharded), tokenizer with chat template, generation config, card and record."""
    demo.model.save_pretrained(directory, max_shard_size=max_shard_size)
    demo.tokenizer.save_pretrained(directory)
    (Path(directory) / "README.md").write_text(model_card(demo, held_out), encoding="utf-8")
    record = json.dumps(training_record(demo, held_out), indent=2) + "\n"
    (Path(directory) / TRAINING_RECORD).write_text(record, encoding="utf-8")
