"""Score an original and an edited model: refusal rates, first-token KL divergence, the report.

One model is in memory at a time: the original is loaded, its replies and its first-token
log-probabilities on the harmless prompts (prompts × vocabulary float64 values, kept on the CPU)
are computed, it is released, and only then is the edited model loaded. Peak memory is that of
the larger model, not of both.

Before any weights are read, the two tokenizers are compared (lib/evaluate/tokenizer_comparison.py: vocabulary,
special tokens, how a fixed sample encodes and decodes, and the chat template where one is used)
together with the configs' vocabulary sizes: a KL divergence over token distributions only means
something when both models share the same tokens and see the same formatted prompts, and refusal
rates only when both models' replies are decoded the same way.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lib import __version__
from lib.ablate.in_memory_edit import InMemoryEditor, edited_in_memory
from lib.ablate.resolution import Resolution
from lib.core.atomic import atomic_file
from lib.core.batching import release_cached_memory
from lib.core.errors import UserError
from lib.core.generation import DecodingSettings, generate_replies
from lib.core.loading import ModelLoadOptions, load_config, load_model, quantization_description, text_config
from lib.core.prompts import file_sha256
from lib.evaluate.divergence import DivergenceSummary, kl_divergence
from lib.evaluate.refusal_markers import RefusalDetector, RefusalVerdict
from lib.evaluate.tokenizer_comparison import tokenizer_differences

HARMFUL = "harmful"
HARMLESS = "harmless"
ORIGINAL = "original"
ABLATED = "ablated"
SAMPLE_REPLY_CHARACTERS = 240


@dataclass(frozen=True)
class ModelSource:
    """A model as the user named it, where its files are, and the flag that named it (for messages)."""

    role: str  # ORIGINAL or ABLATED
    name: str
    directory: Path
    flag: str

    @property
    def label(self) -> str:
        return f"{self.flag} {self.name}"


@dataclass(frozen=True)
class PromptSet:
    kind: str  # HARMFUL or HARMLESS
    path: Path
    prompts: list[str]
    token_ids: list[list[int]]


@dataclass(frozen=True)
class EvaluationSettings:
    decoding: DecodingSettings
    batch_size: int
    load_options: ModelLoadOptions
    system_prompt: str | None
    use_chat_template: bool


@dataclass(frozen=True)
class ScoredReply:
    prompt: str
    reply: str
    verdict: RefusalVerdict


@dataclass
class ModelScores:
    source: ModelSource
    quantization: str | None
    dtype: str
    replies: dict[str, list[ScoredReply]] = field(default_factory=dict)
    harmless_first_token_log_probabilities: torch.Tensor | None = None  # [prompts, vocab] float64, CPU

    def refusals(self, kind: str) -> int:
        return sum(scored.verdict.refused for scored in self.replies[kind])

    def refusal_rate(self, kind: str) -> float:
        return self.refusals(kind) / len(self.replies[kind])


# ---- checks before loading -------------------------------------------------------------------


def check_same_tokens(
    original: ModelSource,
    original_tokenizer: PreTrainedTokenizerBase,
    edited: ModelSource,
    edited_tokenizer: PreTrainedTokenizerBase,
    use_chat_template: bool = True,
) -> None:
    """Stop when the edited model does not encode and decode as the original does, has another vocabulary
    size, or (where prompts are chat-formatted) another chat template."""
    differences = tokenizer_differences(original_tokenizer, edited_tokenizer, use_chat_template)
    original_size = _output_vocabulary_size(original)
    edited_size = _output_vocabulary_size(edited)
    if original_size != edited_size:
        differences.append(f"config vocab_size ({original_size} vs {edited_size})")
    if differences:
        raise UserError(
            f"{edited.label}: tokenizer does not match {original.label}'s (differs in: "
            f"{'; '.join(differences)}); the comparison needs the same tokens and prompt format"
        )


def _output_vocabulary_size(source: ModelSource) -> int | None:
    return getattr(text_config(load_config(source.directory, source.label)), "vocab_size", None)


# ---- scoring ---------------------------------------------------------------------------------


def score_model(
    source: ModelSource,
    tokenizer: PreTrainedTokenizerBase,
    prompt_sets: Sequence[PromptSet],
    detector: RefusalDetector,
    settings: EvaluationSettings,
) -> ModelScores:
    """Load one model, generate and judge its replies to every prompt set, then release it."""
    model = load_model(source.directory, settings.load_options, source.label)
    try:
        return score_loaded_model(model, source, tokenizer, prompt_sets, detector, settings)
    finally:
        del model  # the only reference: the weights can go before the next model loads
        release_cached_memory()


def score_loaded_model(
    model: PreTrainedModel,
    source: ModelSource,
    tokenizer: PreTrainedTokenizerBase,
    prompt_sets: Sequence[PromptSet],
    detector: RefusalDetector,
    settings: EvaluationSettings,
) -> ModelScores:
    """Generate and judge the model's replies to every prompt set (harmless: first-token log-probabilities kept)."""
    scores = ModelScores(source, quantization_description(model), str(model.dtype).removeprefix("torch."))
    for prompt_set in prompt_sets:
        generated = generate_replies(
            model,
            tokenizer,
            prompt_set.token_ids,
            settings.decoding,
            settings.batch_size,
            description=f"{source.role}: {prompt_set.kind} prompts",
            keep_first_token_log_probabilities=prompt_set.kind == HARMLESS,
        )
        scores.replies[prompt_set.kind] = [
            ScoredReply(prompt, reply, detector.judge(reply))
            for prompt, reply in zip(prompt_set.prompts, generated.replies)
        ]
        if prompt_set.kind == HARMLESS:
            scores.harmless_first_token_log_probabilities = generated.first_token_log_probabilities
    return scores


def score_original_and_edit_in_memory(
    original: ModelSource,
    edited: ModelSource,
    editor_for: Callable[[PreTrainedModel], InMemoryEditor],
    resolution: Resolution,
    tokenizer: PreTrainedTokenizerBase,
    prompt_sets: Sequence[PromptSet],
    detector: RefusalDetector,
    settings: EvaluationSettings,
) -> list[ModelScores]:
    """Score the original, apply the resolved plan to it in memory, score again, undo: one model load."""
    model = load_model(original.directory, settings.load_options, original.label)
    try:
        scores = [score_loaded_model(model, original, tokenizer, prompt_sets, detector, settings)]
        with edited_in_memory(editor_for(model), resolution):
            scores.append(score_loaded_model(model, edited, tokenizer, prompt_sets, detector, settings))
        return scores
    finally:
        del model
        release_cached_memory()


def first_token_divergence(original: ModelScores, edited: ModelScores) -> DivergenceSummary:
    """KL(P_original ‖ P_edited) of the first reply token on each harmless prompt."""
    reference = original.harmless_first_token_log_probabilities
    other = edited.harmless_first_token_log_probabilities
    if reference is None or other is None:
        raise ValueError("the harmless prompts' first-token log-probabilities were not kept")
    if reference.shape[-1] != other.shape[-1]:
        raise UserError(
            f"{edited.source.label}: its output has {other.shape[-1]} logits per token but "
            f"{original.source.label}'s has {reference.shape[-1]}; the models do not share a vocabulary"
        )
    return DivergenceSummary.of(kl_divergence(reference, other))


# ---- report ----------------------------------------------------------------------------------


def build_report(
    scores: Sequence[ModelScores],
    divergence: DivergenceSummary | None,
    prompt_sets: Sequence[PromptSet],
    detector: RefusalDetector,
    settings: EvaluationSettings,
) -> dict[str, Any]:
    """The JSON report (schema in docs/evaluate.md): settings, inputs, per-model rates and replies, KL."""
    options = settings.load_options
    return {
        "tool": "evaluate.py",
        "tool_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "transformers_version": str(transformers.__version__),
        "torch_version": str(torch.__version__),
        "settings": {
            "max_new_tokens": settings.decoding.max_new_tokens,
            "decoding": "greedy",
            "batch_size": settings.batch_size,
            "system_prompt": settings.system_prompt,
            "chat_template": settings.use_chat_template,
            "dtype": options.dtype,
            "device_map": options.device_map,
            "quantization": options.quantization,
        },
        "refusal_markers": detector.description(),
        "prompts": {
            prompt_set.kind: {
                "file": str(prompt_set.path),
                "count": len(prompt_set.prompts),
                "sha256": file_sha256(prompt_set.path),
            }
            for prompt_set in prompt_sets
        },
        "models": {model_scores.source.role: _model_report(model_scores) for model_scores in scores},
        "kl_divergence": None
        if divergence is None
        else {
            "measure": f"KL(P_{ORIGINAL} || P_{ABLATED})",
            "token": "first reply token (next-token distribution at the last prompt position)",
            "prompts": HARMLESS,
            "unit": "nats",
            **divergence.as_json(),
        },
    }


def _model_report(scores: ModelScores) -> dict[str, Any]:
    report: dict[str, Any] = {
        "model": scores.source.name,
        "dtype": scores.dtype,
        "quantization": scores.quantization,
    }
    for kind, replies in scores.replies.items():
        report[kind] = {
            "refusals": scores.refusals(kind),
            "prompts": len(replies),
            "refusal_rate": scores.refusal_rate(kind),
        }
    report["replies"] = {
        kind: [
            {
                "prompt": scored.prompt,
                "reply": scored.reply,
                "refusal": scored.verdict.refused,
                "marker": scored.verdict.reason,
            }
            for scored in replies
        ]
        for kind, replies in scores.replies.items()
    }
    return report


def write_report(report: dict[str, Any], path: Path) -> None:
    with atomic_file(path) as temporary:
        temporary.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def format_table(scores: Sequence[ModelScores], divergence: DivergenceSummary | None) -> str:
    """The side-by-side summary: one column per model."""
    rows: list[list[str]] = [
        ["", *(model_scores.source.role for model_scores in scores)],
        ["model", *(model_scores.source.name for model_scores in scores)],
    ]
    for kind, label in ((HARMFUL, "refusals on harmful prompts"), (HARMLESS, "refusals on harmless prompts")):
        rows.append([label, *(_rate_cell(model_scores, kind) for model_scores in scores)])
    if divergence is not None:
        rows.append(
            [
                "first-token KL from original, harmless",
                "-",
                f"mean {divergence.mean:.4g}, median {divergence.median:.4g}, max {divergence.maximum:.4g}",
            ]
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows
    )


def _rate_cell(scores: ModelScores, kind: str) -> str:
    return f"{scores.refusal_rate(kind):.1%} ({scores.refusals(kind)}/{len(scores.replies[kind])})"


def format_samples(scores: Sequence[ModelScores], count: int) -> str:
    """The first `count` prompts of each set with every model's reply, one line each."""
    lines: list[str] = []
    role_width = max(len(model_scores.source.role) for model_scores in scores)
    for kind in (HARMFUL, HARMLESS):
        shown = min(count, len(scores[0].replies[kind]))
        if shown == 0:
            continue
        lines.append(f"Sample replies, {kind} prompts (the first {shown}):")
        for index in range(shown):
            lines.append(f"  [{kind} {index + 1}] {_one_line(scores[0].replies[kind][index].prompt)}")
            for model_scores in scores:
                scored = model_scores.replies[kind][index]
                verdict = f"   [refusal: {scored.verdict.reason}]" if scored.verdict.refused else ""
                lines.append(
                    f"    {model_scores.source.role.ljust(role_width)}: {_one_line(scored.reply)}{verdict}"
                )
    return "\n".join(lines)


def _one_line(text: str) -> str:
    """A reply as one printable line: whitespace collapsed, control characters shown as U+FFFD, truncated."""
    flat = " ".join(text.split())
    printable = "".join(character if character.isprintable() else "\ufffd" for character in flat)
    if len(printable) > SAMPLE_REPLY_CHARACTERS:
        return printable[: SAMPLE_REPLY_CHARACTERS - 1] + "\u2026"
    return printable
