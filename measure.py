"""Measure per-layer refusal directions: mean last-prompt-token residuals of harmful vs harmless prompts.

Writes the `.pt` measurement file of docs/SPEC.md §2 (llm-abliteration compatible keys plus
per-dimension variances and `meta`). See docs/measure.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lib.core.arguments import non_negative_integer
from lib.core.atomic import check_writable_destination
from lib.core.cli_options import add_model_loading_arguments, add_prompt_set_arguments
from lib.core.errors import run_cli
from lib.core.prompts import (
    DEFAULT_HARMFUL_PROMPTS,
    DEFAULT_HARMLESS_PROMPTS,
    SEARCH_HOLD_BACK_RULE,
    load_prompts,
    split_for_search,
)

# Only light modules at the top: --help and usage errors answer before torch and transformers load.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Measure the refusal direction of every layer of a causal LM: the mean residual "
        "stream at the last prompt token for harmful vs harmless prompts, written as a .pt file.",
    )
    parser.add_argument(
        "--model",
        "-m",
        required=True,
        metavar="MODEL",
        help="local model directory or a hub id in the local cache",
    )
    parser.add_argument(
        "--output", "-o", required=True, type=Path, metavar="FILE", help="measurement file to write (.pt)"
    )
    parser.add_argument(
        "--batch-size",
        type=non_negative_integer,
        default=0,
        metavar="N",
        help="prompts per forward pass; 0 (default) = automatic: the largest batch that fits, "
        "halved on out-of-memory",
    )
    parser.add_argument(
        "--data-harmful",
        type=Path,
        default=DEFAULT_HARMFUL_PROMPTS,
        metavar="FILE",
        help="harmful prompts: .txt (one per line), .json, .jsonl, .csv or .parquet "
        "(default: data/harmful.txt)",
    )
    parser.add_argument(
        "--data-harmless",
        type=Path,
        default=DEFAULT_HARMLESS_PROMPTS,
        metavar="FILE",
        help="harmless prompts, same formats (default: data/harmless.txt)",
    )
    add_prompt_set_arguments(parser)
    parser.add_argument(
        "--use-all-prompts",
        action="store_true",
        help="measure on every prompt; by default one in five (chosen by a hash of the text) is held back "
        "so that search.py can score plans on prompts the measurement never saw",
    )
    parser.add_argument(
        "--projected",
        action="store_true",
        help="orthogonalise each refusal direction against that layer's harmless mean (biprojection)",
    )
    add_model_loading_arguments(parser, quantization_flags=("--quant-measure", "--quant", "-q"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    # Everything the user can get wrong is checked before the (slow) model load.
    check_writable_destination(arguments.output, "--output")
    prompt_files = {"harmful": arguments.data_harmful, "harmless": arguments.data_harmless}
    loaded = {name: load_prompts(path, f"--data-{name}") for name, path in prompt_files.items()}
    if not arguments.use_all_prompts:
        loaded = {name: split_for_search(texts)[0] or texts for name, texts in loaded.items()}
    prompts = {name: texts[: arguments.max_prompts] for name, texts in loaded.items()}
    # The prompt files are checked; now the libraries the model needs (seconds to import).
    from lib.core.chat_format import pad_token_id_of, require_chat_template, tokenize_chat_prompts
    from lib.core.loading import ModelLoadOptions, load_model, load_tokenizer
    from lib.core.model_files import resolve_model_directory
    from lib.measure.directions import measurement_meta, refusal_measurements
    from lib.measure.measurements import save_measurements
    from lib.measure.residual_capture import measure_last_token_residuals

    model_directory = resolve_model_directory(arguments.model, "--model")
    label = f"--model {arguments.model}"
    tokenizer = load_tokenizer(model_directory, label)
    use_chat_template = not arguments.no_chat_template
    if use_chat_template:
        require_chat_template(tokenizer, label)
    token_ids = {
        name: tokenize_chat_prompts(tokenizer, texts, arguments.system_prompt, use_chat_template)
        for name, texts in prompts.items()
    }
    check_output_space(arguments.output, model_directory, label)

    options = ModelLoadOptions.from_arguments(arguments)
    model = load_model(model_directory, options, label)
    statistics = {
        name: measure_last_token_residuals(
            model, ids, arguments.batch_size, pad_token_id_of(tokenizer), description=f"{name} prompts"
        )
        for name, ids in token_ids.items()
    }

    meta = measurement_meta(
        model_name=arguments.model,
        model=model,
        prompt_files=prompt_files,
        prompt_counts={name: len(texts) for name, texts in prompts.items()},
        projected=arguments.projected,
        settings={
            "chat_template": use_chat_template,
            "system_prompt": arguments.system_prompt,
            "max_prompts": arguments.max_prompts,
            "held_back_for_search": None if arguments.use_all_prompts else SEARCH_HOLD_BACK_RULE,
            "batch_size": arguments.batch_size,
            "device_map": options.device_map,
        },
    )
    measurements = refusal_measurements(
        statistics["harmful"], statistics["harmless"], arguments.projected, meta
    )
    save_measurements(measurements, arguments.output)
    print(
        f"wrote {arguments.output}: {measurements.num_layers} layers (L = 0..{measurements.num_layers}), "
        f"{len(prompts['harmful'])} harmful and {len(prompts['harmless'])} harmless prompts",
        file=sys.stderr,
    )
    return 0


def check_output_space(output: Path, model_directory: Path, label: str) -> None:
    """Stop before the model loads when the measurement file will not fit where it is to be written."""
    from lib.core.atomic import check_free_space
    from lib.core.loading import load_config, text_config
    from lib.measure.measurements import estimated_file_bytes

    config = text_config(load_config(model_directory, label))
    check_free_space(output, estimated_file_bytes(config.num_hidden_layers, config.hidden_size), "--output")


if __name__ == "__main__":
    run_cli(main)
