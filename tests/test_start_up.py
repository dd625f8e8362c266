"""Entry scripts start at once: `--help` and usage errors answer before torch, transformers and the other
heavy libraries load (they take seconds to import); each script imports them in main() after parsing.

Every check runs in a fresh interpreter, since this test process has long imported everything.
No timings are asserted: what is checked is which modules get imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parent.parent
ENTRY_SCRIPTS = (
    "measure.py",
    "analyze.py",
    "search.py",
    "sharded_ablate.py",
    "chat.py",
    "evaluate.py",
    "run_demo.py",
    "demo/build_model.py",
    "demo/build_toy_model.py",
    "demo/check_report.py",
)
# Packages that cost a noticeable fraction of a second or more to import.
HEAVY = (
    "torch",
    "transformers",
    "safetensors",
    "peft",
    "optuna",
    "matplotlib",
    "numpy",
    "huggingface_hub",
    "tokenizers",
    "accelerate",
    "bitsandbytes",
    "pyarrow",
)
# A flag no script has: argparse rejects it (or a missing required argument) after building the whole parser.
UNKNOWN_FLAG = "--no-such-flag"


def imported_packages(importtime_report: str) -> set[str]:
    """Top-level package names in the `-X importtime` report on stderr."""
    packages = set()
    for line in importtime_report.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            packages.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return packages


def run_script(script: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-X", "importtime", script, *arguments],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize("script", ENTRY_SCRIPTS)
def test_help_imports_nothing_heavy(script: str) -> None:
    result = run_script(script, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout
    packages = imported_packages(result.stderr)
    assert "argparse" in packages, "the -X importtime report was not read"
    assert sorted(packages.intersection(HEAVY)) == []


@pytest.mark.parametrize("script", ENTRY_SCRIPTS)
def test_usage_errors_import_nothing_heavy(script: str) -> None:
    result = run_script(script, UNKNOWN_FLAG)
    assert result.returncode == 2
    assert "usage:" in result.stderr and f"{Path(script).name}: error:" in result.stderr
    assert sorted(imported_packages(result.stderr).intersection(HEAVY)) == []


def test_an_invalid_choice_imports_nothing_heavy() -> None:
    """A bad value for a flag whose choices come from the model-loading options (defined without torch)."""
    result = run_script("measure.py", "--model", "m", "--output", "m.pt", "--dtype", "float8")
    assert result.returncode == 2 and "invalid choice: 'float8'" in result.stderr
    assert sorted(imported_packages(result.stderr).intersection(HEAVY)) == []


@pytest.mark.parametrize("script", ENTRY_SCRIPTS)
def test_building_the_parser_imports_nothing_heavy(script: str) -> None:
    """The convention: every entry script has `build_parser()`, and importing the script and building
    its parser (as tests and tools do in-process) loads no heavy package."""
    module = script.removesuffix(".py").replace("/", ".")
    program = (
        "import importlib, json, sys\n"
        f"parser = importlib.import_module({module!r}).build_parser()\n"
        "parser.format_help()\n"
        f"print(json.dumps(sorted(name for name in {HEAVY!r} if name in sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], cwd=REPOSITORY, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.splitlines()[-1]) == []


def test_light_option_modules_import_nothing_heavy() -> None:
    """The shared flags and settings the parsers use are importable without torch."""
    modules = (
        "lib.core.cli_options",
        "lib.core.arguments",
        "lib.core.prompts",
        "lib.evaluate.refusal_markers",
        "demo.toy_settings",
        "demo.tuning_settings",
        "demo.base_model",
    )
    program = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        f"print(json.dumps(sorted(name for name in {HEAVY!r} if name in sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], cwd=REPOSITORY, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.splitlines()[-1]) == []


def test_the_heavy_modules_use_the_light_definitions() -> None:
    """One definition of each choice: lib.core.loading and lib.core.chat_format build on lib.core.cli_options."""
    import lib.core.chat_format
    import lib.core.cli_options
    import lib.core.loading

    assert tuple(lib.core.loading.DTYPES) == lib.core.cli_options.DTYPE_NAMES
    assert lib.core.loading.add_model_loading_arguments is lib.core.cli_options.add_model_loading_arguments
    assert lib.core.chat_format.add_prompt_set_arguments is lib.core.cli_options.add_prompt_set_arguments
    assert lib.core.chat_format.NO_CHAT_TEMPLATE_FLAG == lib.core.cli_options.NO_CHAT_TEMPLATE_FLAG


def test_measure_accepts_quant_as_well_as_quant_measure() -> None:
    """`--quant` as in the other scripts, listed in --help (not only accepted as an abbreviation)."""
    import measure

    parser = measure.build_parser()
    assert "--quant {4bit,8bit}" in parser.format_help()
    base = ["--model", "m", "--output", "m.pt"]
    for flag in ("--quant-measure", "--quant", "-q"):
        arguments = parser.parse_args([*base, flag, "4bit"])
        assert (arguments.quantization, arguments.quantization_flag) == ("4bit", "--quant-measure")
