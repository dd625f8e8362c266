"""Train the demo chat model on the project's prompt sets and write it as a Hugging Face model.

    python demo/build_toy_model.py --output demo-model

The model is a small LlamaForCausalLM with its own tokenizer and chat template that refuses
harmful requests and answers harmless ones (see docs/test-model.md). It trains on data/harmful.txt,
data/harmless.txt, data/demo_train_harmful.txt and data/demo_train_harmless.txt; the refusal
rates printed at the end are measured on the held-out data/eval_harmful.txt and
data/eval_harmless.txt, which it never sees. The same flags, data and torch build give the same
weights.

The repository ships the model this command builds with its defaults in demo/model/. After
changing the training data or the defaults, regenerate it with

    rm -rf demo/model && python demo/build_toy_model.py --output demo/model --threads 2
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

# Entry scripts run as `python demo/build_toy_model.py`: make the repository's `lib` importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo.toy_settings import DemoSettings
from lib.core.arguments import positive_float, positive_integer
from lib.core.atomic import atomic_directory, check_new_directory
from lib.core.errors import UserError, run_cli

# Only light modules at the top: --help and usage errors answer before torch and transformers load.
# main() imports the rest.

DEFAULTS = DemoSettings()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--output",
        type=Path,
        required=True,
        help="directory to create for the model; must not exist yet (written atomically)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=DEFAULTS.seed,
        help=f"seed for initialisation, reply templates and batch order (default {DEFAULTS.seed})",
    )
    parser.add_argument(
        "--steps",
        type=positive_integer,
        default=DEFAULTS.steps,
        help=f"optimiser steps (default {DEFAULTS.steps})",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_integer,
        default=DEFAULTS.batch_size,
        help=f"prompts per step (default {DEFAULTS.batch_size})",
    )
    parser.add_argument(
        "--learning-rate",
        type=positive_float,
        default=DEFAULTS.learning_rate,
        help=f"peak AdamW learning rate (default {DEFAULTS.learning_rate})",
    )
    parser.add_argument(
        "--layers",
        type=positive_integer,
        default=DEFAULTS.num_hidden_layers,
        help=f"decoder layers (default {DEFAULTS.num_hidden_layers})",
    )
    parser.add_argument(
        "--hidden-size",
        type=positive_integer,
        default=DEFAULTS.hidden_size,
        help=f"residual width, a multiple of {DEFAULTS.num_attention_heads} attention heads; "
        f"the MLP is three times wider (default {DEFAULTS.hidden_size})",
    )
    parser.add_argument(
        "--vocab-size",
        type=positive_integer,
        default=DEFAULTS.vocab_size,
        help=f"byte-level BPE vocabulary to train, special tokens included (default {DEFAULTS.vocab_size})",
    )
    parser.add_argument(
        "--threads",
        type=positive_integer,
        default=None,
        help="CPU threads for torch (default: torch's own choice, usually all cores)",
    )
    parser.add_argument(
        "--max-shard-size",
        default="2MB",
        help="largest weight shard, as save_pretrained accepts it (default 2MB: a few shards)",
    )
    return parser


def settings_from(arguments: argparse.Namespace) -> DemoSettings:
    if arguments.hidden_size % DEFAULTS.num_attention_heads:
        raise UserError(
            f"--hidden-size {arguments.hidden_size}: must be a multiple of {DEFAULTS.num_attention_heads} "
            "(the number of attention heads)"
        )
    return DemoSettings(
        seed=arguments.seed,
        steps=arguments.steps,
        batch_size=arguments.batch_size,
        learning_rate=arguments.learning_rate,
        num_hidden_layers=arguments.layers,
        hidden_size=arguments.hidden_size,
        intermediate_size=3 * arguments.hidden_size,
        vocab_size=arguments.vocab_size,
    )


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    settings = settings_from(arguments)
    check_new_directory(arguments.output, "--output")
    import torch
    from tqdm import tqdm

    from demo.toy_model import (
        EVALUATION_FILES,
        evaluate_refusals,
        read_prompts,
        read_training_prompts,
        save_demo_model,
        train_demo_model,
    )

    if arguments.threads:
        torch.set_num_threads(arguments.threads)

    harmful, harmless = (read_training_prompts(kind) for kind in ("harmful", "harmless"))
    with tqdm(total=settings.steps, desc="training", unit="step") as progress:

        def show_step(step: int, loss: float) -> None:
            progress.set_postfix(loss=f"{loss:.3f}", refresh=False)
            progress.update()

        demo = train_demo_model(settings, harmful, harmless, show_step)
    print(
        f"trained {settings.steps} steps in {demo.training_seconds:.1f} s "
        f"({len(harmful)} harmful + {len(harmless)} harmless prompts)"
    )

    held_out = evaluate_refusals(
        demo.model,
        demo.tokenizer,
        *(read_prompts(EVALUATION_FILES[kind]) for kind in ("harmful", "harmless")),
    )
    print(
        f"held-out refusal rate: harmful {held_out.harmful:.1%} ({EVALUATION_FILES['harmful'].name}), "
        f"harmless {held_out.harmless:.1%} ({EVALUATION_FILES['harmless'].name})"
    )

    with atomic_directory(arguments.output) as temporary:
        save_demo_model(demo, held_out, temporary, arguments.max_shard_size)
    print(f"wrote {arguments.output}")
    return 0


if __name__ == "__main__":
    run_cli(main)
