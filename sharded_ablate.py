"""Apply a YAML ablation plan to a safetensors checkpoint, one tensor at a time.

    python sharded_ablate.py PLAN.yml [--dry-run] [--overwrite] [--link]
                             [--projected] [--normpreserve] [--invert] [--device auto|cpu|cuda]

The plan (docs/ablate.md) names the model, the measurement file, the output directory and the
layers to edit. Everything is validated and resolved into an explicit list of tensor edits before
anything is written; the output is built beside its final name and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lib.core.atomic import atomic_directory, recover_interrupted
from lib.core.errors import UserError, run_cli, writing

# Only light modules at the top: --help and usage errors answer before torch loads (main imports the rest).
if TYPE_CHECKING:
    import torch


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Project refusal directions out of a model's weights, streaming its safetensors shards.",
        epilog="The plan format, every key and its default are described in docs/ablate.md.",
    )
    parser.add_argument(
        "plan", help="YAML plan: model, measurements, output, ablate entries (see docs/ablate.md)"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the plan, print the resolved list of tensor edits and exit without writing",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output directory, only once the new output is complete, "
        "and only a previous output of this tool holding nothing but the files it wrote "
        "there; any other directory is refused and left untouched",
    )
    parser.add_argument(
        "--link",
        action="store_true",
        help="hard-link shards that need no edit instead of copying them (same filesystem only; "
        "the linked files are then shared with the input)",
    )
    parser.add_argument(
        "--projected",
        action="store_true",
        help="for every entry, orthogonalise the direction against the edited layer's harmless mean",
    )
    parser.add_argument(
        "--normpreserve",
        action="store_true",
        help="for every entry, rescale each edited vector written to the residual stream to its original norm",
    )
    parser.add_argument(
        "--invert",
        action="store_true",
        help="for every entry, negate the scale: add the direction instead of removing it",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where the projection math runs (default: the GPU when one is present)",
    )
    return parser


def compute_device(choice: str) -> torch.device:
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available; use --device cpu or auto")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    from tqdm import tqdm

    from lib.ablate.checkpoint import open_checkpoint
    from lib.ablate.companion_files import (
        copy_non_weight_files,
        non_weight_bytes,
        non_weight_files,
        output_config,
    )
    from lib.ablate.output_guard import check_output_location, output_lock
    from lib.ablate.plan import load_plan
    from lib.ablate.record import edit_table, write_plan_and_card
    from lib.ablate.resolution import resolve
    from lib.ablate.safetensors_stream import return_freed_tensors_to_the_system
    from lib.ablate.writing import plan_output, write_index, write_weights
    from lib.core.atomic import check_free_space
    from lib.measure.measurements import load_measurements

    return_freed_tensors_to_the_system()
    device = compute_device(arguments.device)
    plan = load_plan(arguments.plan).with_overrides(
        arguments.projected, arguments.normpreserve, arguments.invert
    )
    checkpoint = open_checkpoint(plan.model)
    measurements = load_measurements(plan.measurements)
    resolution = resolve(plan, checkpoint, measurements)
    shards = plan_output(checkpoint, resolution)
    edited_shards = sum(not shard.is_unchanged for shard in shards)
    print(
        f"model: {checkpoint.directory} ({checkpoint.model_type}, {checkpoint.num_layers} layers, "
        f"{len(shards)} shard{'s' * (len(shards) > 1)})"
    )
    print(
        f"plan: {plan.source}: {len(resolution.edits)} tensor edits in {edited_shards} of {len(shards)} shards; "
        "every other tensor is copied bit-identical"
        + (" (MXFP4 experts are written dequantised, exactly)" if checkpoint.is_packed else "")
    )
    if arguments.dry_run:
        print(edit_table(resolution.edits))
        return 0

    check_output_location(plan.output, checkpoint.directory, arguments.overwrite)
    if arguments.link:
        check_link_possible(plan.output, checkpoint.directory)
    copied_files, skipped_files = non_weight_files(checkpoint)
    with output_lock(plan.output):
        for action in recover_interrupted(plan.output):
            print(action)
        # Again, now that we hold the lock and an interrupted replacement may have put an output back.
        check_output_location(plan.output, checkpoint.directory, arguments.overwrite)
        weight_bytes = sum(shard.nbytes for shard in shards)
        linked_bytes = sum(shard.nbytes for shard in shards if shard.is_unchanged) if arguments.link else 0
        check_free_space(plan.output, weight_bytes - linked_bytes + non_weight_bytes(copied_files))
        with (
            writing(plan.output),
            atomic_directory(plan.output, replace_existing=arguments.overwrite) as staging,
        ):
            with tqdm(
                total=weight_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="writing"
            ) as progress:
                write_weights(shards, staging, arguments.link, device, progress.update)
            write_index(checkpoint, shards, staging)
            copy_non_weight_files(copied_files, staging, output_config(checkpoint, resolution))
            write_plan_and_card(plan, checkpoint, resolution, skipped_files, staging)
    for path in skipped_files:
        print(f"not copied (weights in another format): {path.name}")
    print(f"wrote {plan.output}")
    return 0


def check_link_possible(output: Path, input_directory: Path) -> None:
    output_device = os.stat(output.absolute().parent).st_dev
    if os.stat(os.path.realpath(input_directory)).st_dev != output_device:
        raise UserError(
            f"--link: the output {output} is on another filesystem than the input; "
            "hard links are impossible there, drop --link to copy"
        )


if __name__ == "__main__":
    run_cli(main)
