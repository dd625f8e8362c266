"""Score a model, or an original and its edited (ablated) version side by side.

Refusal rate on held-out harmful prompts, over-refusal on held-out harmless prompts (greedy
replies judged by refusal markers), and the KL divergence of the first reply token from the
original on the harmless prompts. The models are loaded one after the other, never both at once.
See docs/evaluate.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lib.core.arguments import non_negative_integer, positive_integer
from lib.core.atomic import check_writable_destination
from lib.core.cli_options import add_model_loading_arguments, add_prompt_set_arguments
from lib.core.errors import UserError, run_cli
from lib.core.prompts import (
    DEFAULT_EVALUATION_HARMFUL_PROMPTS,
    DEFAULT_EVALUATION_HARMLESS_PROMPTS,
    load_prompts,
)
from lib.evaluate.refusal_markers import DEFAULT_REFUSAL_MARKERS, load_refusal_detector

# Only light modules at the top: --help and usage errors answer before torch and transformers load.
# The functions import the rest where they need it.
if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from lib.ablate.checkpoint import Checkpoint
    from lib.ablate.in_memory_edit import InMemoryEditor
    from lib.ablate.resolution import Resolution
    from lib.evaluate.evaluation import ModelSource


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Refusal rate on harmful prompts, over-refusal on harmless prompts and the first-token "
        "KL divergence between an original model and its ablated version, side by side. The original is "
        "scored and released before the ablated model is loaded: memory for one model is enough.",
    )
    parser.add_argument(
        "--model",
        "-m",
        required=True,
        metavar="ORIGINAL",
        help="the original model: a local model directory or a hub id in the local cache",
    )
    edited = parser.add_mutually_exclusive_group()
    edited.add_argument(
        "--ablated",
        "-a",
        default=None,
        metavar="EDITED",
        help="the edited model to compare with ORIGINAL (it must use the same tokenizer and chat template); "
        "without it (and without --plan), only ORIGINAL is scored",
    )
    edited.add_argument(
        "--plan",
        type=Path,
        default=None,
        metavar="PLAN.yml",
        help="preview a plan instead: apply PLAN.yml's edits to ORIGINAL in memory, exactly as "
        "sharded_ablate.py would write them, and report as --ablated would on the written model; "
        "nothing is written and ORIGINAL loads once (the plan's measurement file is used; its "
        "model and output keys are not)",
    )
    parser.add_argument(
        "--harmful",
        type=Path,
        default=DEFAULT_EVALUATION_HARMFUL_PROMPTS,
        metavar="FILE",
        help="harmful prompts whose refusal rate is measured: .txt (one per line), .json, .jsonl, .csv or "
        ".parquet (default: data/eval_harmful.txt, held out from measurement)",
    )
    parser.add_argument(
        "--harmless",
        type=Path,
        default=DEFAULT_EVALUATION_HARMLESS_PROMPTS,
        metavar="FILE",
        help="harmless prompts for the over-refusal rate and the KL divergence, same formats "
        "(default: data/eval_harmless.txt)",
    )
    add_prompt_set_arguments(parser)
    parser.add_argument(
        "--max-new-tokens",
        type=positive_integer,
        default=64,
        metavar="N",
        help="length limit of each greedy reply in tokens (default: 64; refusals show in the opening)",
    )
    parser.add_argument(
        "--batch-size",
        type=non_negative_integer,
        default=0,
        metavar="N",
        help="prompts generated together; 0 (default) = automatic: the largest batch the free memory "
        "should hold, halved on out-of-memory",
    )
    parser.add_argument(
        "--markers",
        type=Path,
        default=DEFAULT_REFUSAL_MARKERS,
        metavar="FILE",
        help="refusal marker phrases, one per line, # comments (default: data/refusal_markers.txt); "
        "replaces the default list",
    )
    parser.add_argument(
        "--samples",
        type=non_negative_integer,
        default=3,
        metavar="N",
        help="print the replies to the first N prompts of each set (default: 3; 0: none)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        metavar="REPORT",
        help="also write the full report, every reply included, as JSON (written atomically)",
    )
    add_model_loading_arguments(parser, quantization_flags=("--quant",))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    # Everything the user can get wrong is checked before the (slow) model loads.
    if arguments.json is not None:
        check_writable_destination(arguments.json, "--json")
    if arguments.plan is not None and arguments.quantization:
        raise UserError(
            f"--plan with {arguments.quantization_flag} {arguments.quantization}: a preview edits the "
            "loaded weights, which must not be quantised; drop the flag (or write the model with "
            "sharded_ablate.py and evaluate it with --ablated)"
        )
    from lib.core.chat_format import require_chat_template, tokenize_chat_prompts
    from lib.core.generation import DecodingSettings
    from lib.core.loading import ModelLoadOptions, check_weight_files, load_tokenizer
    from lib.core.model_files import resolve_model_directory
    from lib.evaluate.evaluation import (
        ABLATED,
        HARMFUL,
        HARMLESS,
        ORIGINAL,
        EvaluationSettings,
        ModelSource,
        PromptSet,
        build_report,
        check_same_tokens,
        first_token_divergence,
        format_samples,
        format_table,
        score_model,
        score_original_and_edit_in_memory,
        write_report,
    )

    detector = load_refusal_detector(arguments.markers, "--markers")
    prompt_files = {HARMFUL: arguments.harmful, HARMLESS: arguments.harmless}
    prompts = {
        kind: load_prompts(path, f"--{kind}")[: arguments.max_prompts] for kind, path in prompt_files.items()
    }
    sources = [ModelSource(ORIGINAL, arguments.model, resolve_model_directory(arguments.model), "--model")]
    preview = None if arguments.plan is None else plan_preview(arguments.plan, sources[0])
    if arguments.ablated is not None:
        directory = resolve_model_directory(arguments.ablated, "--ablated")
        sources.append(ModelSource(ABLATED, arguments.ablated, directory, "--ablated"))
    for source in sources:  # not only when its turn to load comes, after the original has been scored
        check_weight_files(source.directory)
    tokenizers = [load_tokenizer(source.directory, source.label) for source in sources]
    use_chat_template = not arguments.no_chat_template
    if use_chat_template:
        for source, tokenizer in zip(sources, tokenizers):
            require_chat_template(tokenizer, source.label)
    if len(sources) == 2:
        check_same_tokens(sources[0], tokenizers[0], sources[1], tokenizers[1], use_chat_template)
    prompt_sets = [
        PromptSet(
            kind,
            prompt_files[kind],
            texts,
            tokenize_chat_prompts(tokenizers[0], texts, arguments.system_prompt, use_chat_template),
        )
        for kind, texts in prompts.items()
    ]

    settings = EvaluationSettings(
        decoding=DecodingSettings(max_new_tokens=arguments.max_new_tokens),
        batch_size=arguments.batch_size,
        load_options=ModelLoadOptions.from_arguments(arguments),
        system_prompt=arguments.system_prompt,
        use_chat_template=use_chat_template,
    )
    if preview is None:
        scores = [
            score_model(source, tokenizer, prompt_sets, detector, settings)
            for source, tokenizer in zip(sources, tokenizers)
        ]
    else:
        scores = score_original_and_edit_in_memory(
            sources[0],
            preview.source,
            preview.editor_for,
            preview.resolution,
            tokenizers[0],
            prompt_sets,
            detector,
            settings,
        )
    divergence = first_token_divergence(scores[0], scores[1]) if len(scores) == 2 else None

    print(format_table(scores, divergence))
    if arguments.samples:
        print()
        print(format_samples(scores, arguments.samples))
    if arguments.json is not None:
        write_report(build_report(scores, divergence, prompt_sets, detector, settings), arguments.json)
        print(f"wrote {arguments.json}", file=sys.stderr)
    return 0


@dataclass(frozen=True)
class PlanPreview:
    source: ModelSource
    checkpoint: Checkpoint
    resolution: Resolution

    def editor_for(self, model: PreTrainedModel) -> InMemoryEditor:
        from lib.ablate.in_memory_edit import InMemoryEditor

        return InMemoryEditor(model, self.checkpoint)


def plan_preview(plan_path: Path, original: ModelSource) -> PlanPreview:
    """The plan resolved against ORIGINAL's checkpoint, before any model loads: its errors come first."""
    from lib.ablate.checkpoint import open_checkpoint
    from lib.ablate.plan import load_plan
    from lib.ablate.resolution import resolve
    from lib.evaluate.evaluation import ABLATED, ModelSource
    from lib.measure.measurements import load_measurements

    plan = load_plan(plan_path)
    checkpoint = open_checkpoint(original.directory, "--model")
    resolution = resolve(plan, checkpoint, load_measurements(plan.measurements))
    print(
        f"previewing {plan_path}: {len(resolution.edits)} tensor edits applied to {original.name} in memory",
        file=sys.stderr,
    )
    return PlanPreview(
        ModelSource(ABLATED, f"{original.name} + {plan_path}", original.directory, "--plan"),
        checkpoint,
        resolution,
    )


if __name__ == "__main__":
    run_cli(main)
