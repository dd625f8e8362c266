"""Train the LoRA adapter that makes the demo's base model (SmolLM2-135M-Instruct) refuse harmful requests.

    python demo/build_model.py --output demo/adapter.new

The base model answers almost every harmful request; this is its safety fine-tuning (see
demo/refusal_tuning.py and docs/demo.md). It trains on the project's training prompt sets
(`data/harmful.txt`, `data/demo_train_harmful.txt`, `data/harmless.txt`,
`data/demo_train_harmless.txt`), holding a fixed random slice of each kind back: the refusal rates
printed at the end are measured on that slice. The held-out `data/eval_*` prompts are never read,
so evaluate.py's figures stay held out. The output is a peft adapter directory (a few MB) with
`training.json`, the record of how it was built; the repository ships it in `demo/adapter/`:

    python demo/build_model.py --output /tmp/adapter && rm -rf demo/adapter && mv /tmp/adapter demo/adapter
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

# Entry scripts run as `python demo/build_model.py`: make the repository's `lib` and `demo` importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo.base_model import base_model_directory, default_cache_directory
from demo.tuning_settings import TuningSettings
from lib.core.arguments import non_negative_integer, positive_float, positive_integer
from lib.core.atomic import atomic_directory, check_new_directory
from lib.core.errors import run_cli

# Only light modules at the top: --help and usage errors answer before torch, transformers and peft
# load. main() imports the rest.

DEFAULTS = TuningSettings()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--output",
        type=Path,
        required=True,
        help="adapter directory to create; must not exist yet (written atomically)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=default_cache_directory(),
        help="where the converted base model is kept (default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=DEFAULTS.seed,
        help="seed for the held-back slice, the refusal wording, the adapter's initialisation "
        "and the batch order (default %(default)s)",
    )
    parser.add_argument(
        "--steps", type=positive_integer, default=DEFAULTS.steps, help="optimiser steps (default %(default)s)"
    )
    parser.add_argument(
        "--batch-size",
        type=positive_integer,
        default=DEFAULTS.batch_size,
        help="examples per step, drawn from both kinds in proportion to their counts (default %(default)s)",
    )
    parser.add_argument(
        "--learning-rate",
        type=positive_float,
        default=DEFAULTS.learning_rate,
        help="peak AdamW learning rate (default %(default)s)",
    )
    parser.add_argument(
        "--rank",
        type=positive_integer,
        default=DEFAULTS.lora_rank,
        help="LoRA rank; alpha is twice the rank (default %(default)s)",
    )
    parser.add_argument(
        "--harmful-examples",
        type=positive_integer,
        default=DEFAULTS.harmful_examples,
        help="harmful prompts to train on, each with a drawn refusal (default %(default)s)",
    )
    parser.add_argument(
        "--harmless-examples",
        type=positive_integer,
        default=DEFAULTS.harmless_examples,
        help="harmless prompts answered by the base model to train on (default %(default)s)",
    )
    parser.add_argument(
        "--first-token-weight",
        type=positive_float,
        default=DEFAULTS.first_reply_token_weight,
        help="weight of each reply's first token in the loss, where the model decides between refusing "
        "and answering; the other reply tokens weigh 1 (default %(default)s)",
    )
    parser.add_argument(
        "--teacher-top-k",
        type=non_negative_integer,
        default=DEFAULTS.teacher_top_k,
        help="harmless replies learn the base model's next-token distribution over its K "
        "likeliest tokens at every reply token; 0 trains on the reply's tokens alone "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=positive_integer,
        default=None,
        help="CPU threads for torch (default: torch's own choice, usually all cores)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    check_new_directory(arguments.output, "--output")
    import torch
    from tqdm import tqdm

    from demo.refusal_tuning import build_adapter, write_adapter

    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    settings = TuningSettings(
        seed=arguments.seed,
        steps=arguments.steps,
        batch_size=arguments.batch_size,
        learning_rate=arguments.learning_rate,
        lora_rank=arguments.rank,
        lora_alpha=2 * arguments.rank,
        harmful_examples=arguments.harmful_examples,
        harmless_examples=arguments.harmless_examples,
        first_reply_token_weight=arguments.first_token_weight,
        teacher_top_k=arguments.teacher_top_k,
    )
    base = base_model_directory(arguments.cache_dir)
    with tqdm(total=settings.steps, desc="training", unit="step", dynamic_ncols=True) as progress:

        def show_step(step: int, loss: float) -> None:
            progress.set_postfix(loss=f"{loss:.3f}", refresh=False)
            progress.update()

        built = build_adapter(base, settings, show_step)
    print(
        f"trained {settings.steps} steps in {built.record['training_seconds']:.0f} s; held-back refusal rates: "
        + ", ".join(f"{kind} {rate:.1%}" for kind, rate in built.record["held_back_refusal_rate"].items())
    )
    with atomic_directory(arguments.output) as staging:
        write_adapter(built, staging)
    print(f"wrote {arguments.output}")
    return 0


if __name__ == "__main__":
    run_cli(main)
