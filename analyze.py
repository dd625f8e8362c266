"""Per-layer analysis of a measurement file: a table (or JSON), a chart, and a starting ablation plan.

    python analyze.py MEASUREMENTS.pt [--chart [PNG]] [--show] [--json]
                      [--suggest PLAN.yml --model DIR --output DIR]

Metrics, score and the plan heuristic are documented in docs/analyze.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from lib.core.atomic import check_writable_destination
from lib.core.errors import UserError, run_cli

# Only light modules at the top: --help and usage errors answer before torch loads (main imports the rest).

DEFAULT_CHART = "beside the measurements"  # sentinel for a bare --chart


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Per-layer signal metrics of a refusal-direction measurement file, an optional chart "
        "and a suggested starting ablation plan. Columns, score and heuristic: docs/analyze.md.",
    )
    parser.add_argument(
        "measurements",
        type=Path,
        metavar="MEASUREMENTS.pt",
        help="file written by measure.py (or by llm-abliteration's measure.py)",
    )
    parser.add_argument(
        "--chart",
        nargs="?",
        const=DEFAULT_CHART,
        metavar="PNG",
        help="write a PNG chart of the metrics, headless (default: MEASUREMENTS.png beside the file)",
    )
    parser.add_argument(
        "--show",
        action="store_true",
        help="open the chart in a window (needs a display); without --chart nothing is written",
    )
    parser.add_argument(
        "--suggest",
        type=Path,
        metavar="PLAN.yml",
        help="write a commented YAML ablation plan for sharded_ablate.py (never overwrites an existing "
        "file); needs --model and --output",
    )
    parser.add_argument(
        "--model",
        metavar="DIR",
        help="with --suggest: the measured model (directory or cached hub id); its layer count and "
        "hidden size must match the file",
    )
    parser.add_argument(
        "--output",
        metavar="DIR",
        help="with --suggest: the directory sharded_ablate.py should write the edited model to",
    )
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON instead of the table")
    return parser


def chart_path(arguments: argparse.Namespace) -> Path | None:
    if arguments.chart is None:
        return None
    path = (
        arguments.measurements.with_suffix(".png")
        if arguments.chart == DEFAULT_CHART
        else Path(arguments.chart)
    )
    if path.suffix.lower() != ".png":
        raise UserError(f"--chart {path}: must be a .png path")
    check_writable_destination(path, "--chart")
    return path


def plan_locations(arguments: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[str, str] | None:
    """The plan's `model` and `output` values, validated before any work; None without --suggest."""
    if arguments.suggest is None:
        if arguments.model or arguments.output:
            parser.error("--model and --output are only used with --suggest")
        return None
    if not arguments.model or not arguments.output:
        parser.error("--suggest needs --model DIR and --output DIR")
    from lib.analyze.plan_suggestion import check_plan_destination

    check_plan_destination(arguments.suggest)
    # Absolute paths keep the plan valid wherever it is moved or run from; hub ids stay ids.
    model = str(Path(arguments.model).resolve()) if Path(arguments.model).is_dir() else arguments.model
    return model, str(Path(arguments.output).resolve())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    chart = chart_path(arguments)
    locations = plan_locations(arguments, parser)
    from lib.analyze.plan_suggestion import check_model_matches, plan_yaml, suggest_plan, write_plan
    from lib.analyze.report import format_summary, format_table, report_data
    from lib.analyze.signal_metrics import analyze_measurements
    from lib.core.model_files import read_config, resolve_model_directory
    from lib.measure.measurements import load_measurements

    measurements = load_measurements(arguments.measurements)
    if locations is not None:
        check_model_matches(
            read_config(resolve_model_directory(arguments.model)), measurements, arguments.model
        )
    report = analyze_measurements(measurements)
    suggestion = suggest_plan(report, measurements.num_layers)
    if locations is not None and suggestion is None:
        raise UserError(
            f"{arguments.measurements}: no candidate measurement layer carries a refusal signal; "
            "cannot suggest a plan"
        )

    if arguments.json:
        print(json.dumps(report_data(measurements, report, suggestion), indent=2))
    else:
        print(format_table(report))
        print(format_summary(report, suggestion))

    title = f"Refusal-direction analysis: {arguments.measurements.name}"
    if chart is not None or arguments.show:
        from lib.analyze.charts import (  # matplotlib is only imported when a chart is wanted
            save_chart,
            show_chart,
        )

        if chart is not None:
            save_chart(report, suggestion, title, chart)
            print(f"wrote chart {chart}", file=sys.stderr)
        if arguments.show:
            show_chart(report, suggestion, title)
    if locations is not None:
        model, output = locations
        text = plan_yaml(
            suggestion,
            report,
            measurements.num_layers,
            model=model,
            measurements=arguments.measurements.resolve(),
            output=output,
        )
        write_plan(text, arguments.suggest)
        print(f"wrote plan {arguments.suggest}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
