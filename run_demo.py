"""The whole pipeline on the bundled demo model, end to end, on a laptop CPU in minutes.

    python run_demo.py [--output-dir demo-output] [--model DIR | --rebuild]

1. takes the demo chat model shipped in demo/model/ (a small Llama trained by demo/build_model.py
   on this project's prompt sets to refuse harmful requests and answer harmless ones), or with
   --rebuild trains it again from those sets;
2. measure.py       -> measurements.pt
3. analyze.py       -> chart.png and plan.yml (the suggested plan, used as written)
4. sharded_ablate.py -> model-ablated/
5. evaluate.py      -> report.json: refusal rates and KL divergence, original vs edited.

Every stage runs as its own process with the same command a user would type, so the demo proves
the scripts themselves, not a shortcut around them. Every artefact stays in the output folder.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from lib.demo_model import SHIPPED_MODEL_DIRECTORY
from lib.errors import UserError, run_cli

REPOSITORY = Path(__file__).resolve().parent


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run measure -> analyze -> ablate -> evaluate on the demo model.")
    parser.add_argument("--output-dir", type=Path, default=Path("demo-output"),
                        help="folder for every artefact: measurements.pt, chart.png, plan.yml, "
                             "model-ablated/, report.json, and model/ with --rebuild (default: demo-output); "
                             "earlier results in it are replaced")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, default=None,
                        help="run the pipeline on this model directory instead of the shipped demo model "
                             f"({SHIPPED_MODEL_DIRECTORY.relative_to(REPOSITORY)}/)")
    source.add_argument("--rebuild", action="store_true",
                        help="train the demo model again with demo/build_model.py's defaults into "
                             "OUTPUT_DIR/model (about 8 minutes on 2 CPU cores; reused if already there) "
                             "instead of using the shipped one")
    return parser.parse_args(argv)


def run_stage(title: str, command: list[str]) -> None:
    """Run one stage as a user would, echoing its command; stop the demo if it fails."""
    print(f"\n=== {title}\n$ {shlex.join(command)}", flush=True)
    status = subprocess.run(command, check=False, cwd=REPOSITORY).returncode
    if status != 0:
        raise UserError(f"{title}: `{shlex.join(command)}` failed with exit status {status}")


def demo_model(output_dir: Path, prebuilt: Path | None, rebuild: bool) -> Path:
    if rebuild:
        return rebuilt_demo_model(output_dir)
    if prebuilt is None:
        if not (SHIPPED_MODEL_DIRECTORY / "config.json").is_file():
            raise UserError(f"shipped demo model {SHIPPED_MODEL_DIRECTORY}: missing (no config.json); "
                            "restore it from git or pass --rebuild")
        return SHIPPED_MODEL_DIRECTORY
    if not (prebuilt / "config.json").is_file():
        raise UserError(f"--model {prebuilt}: not a model directory (no config.json)")
    return prebuilt


def rebuilt_demo_model(output_dir: Path) -> Path:
    model = output_dir / "model"
    if (model / "config.json").is_file():
        print(f"reusing the demo model in {model} (delete it to rebuild)")
        return model
    run_stage("build the demo model", [sys.executable, "demo/build_model.py", "--output", str(model)])
    return model


def remove_previous_results(output_dir: Path) -> None:
    for name in ("measurements.pt", "chart.png", "plan.yml", "report.json"):
        (output_dir / name).unlink(missing_ok=True)
    shutil.rmtree(output_dir / "model-ablated", ignore_errors=True)


def print_summary(report_path: Path) -> None:
    report = json.loads(report_path.read_text())
    models = report["models"]
    print("\n=== result (held-out prompts)")
    print(f"{'':24}{'original':>10}{'ablated':>10}")
    for prompt_set, label in (("harmful", "refusals on harmful"), ("harmless", "refusals on harmless")):
        rates = [f"{models[name][prompt_set]['refusal_rate']:>10.1%}" for name in ("original", "ablated")]
        print(f"{label:24}{''.join(rates)}")
    print(f"{'first-token KL (nats)':24}{'':>10}{report['kl_divergence']['mean']:>10.4f}")


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    output_dir = arguments.output_dir.resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    model = demo_model(output_dir, arguments.model, arguments.rebuild).resolve()
    remove_previous_results(output_dir)
    measurements, plan, ablated, report = (output_dir / name for name in
                                           ("measurements.pt", "plan.yml", "model-ablated", "report.json"))
    python = sys.executable
    run_stage("measure", [python, "measure.py", "--model", str(model), "--output", str(measurements)])
    run_stage("analyze", [python, "analyze.py", str(measurements), "--chart", str(output_dir / "chart.png"),
                          "--suggest", str(plan), "--model", str(model), "--output", str(ablated)])
    run_stage("ablate", [python, "sharded_ablate.py", str(plan)])
    run_stage("evaluate", [python, "evaluate.py", "--model", str(model), "--ablated", str(ablated),
                           "--json", str(report)])
    print_summary(report)
    print(f"\nartefacts in {output_dir}: measurements.pt, chart.png, plan.yml, model-ablated/, report.json")
    return 0


if __name__ == "__main__":
    run_cli(main)
