"""Benchmark search.py: what one trial costs against one try of the manual loop, and quality per minute.

Same run, same machine, same model (by default the README demo's refusing SmolLM2-135M-Instruct,
from the cache run_demo.py fills; or --model DIR):

  manual try   what users of the older tools do for every plan they try: write the edited model
               (sharded_ablate.py) and score it (evaluate.py --ablated on the held-out prompts).
  preview      evaluate.py --plan: the same report from the edit in memory, nothing written.
  trial        one search.py trial: the plan applied in memory, short greedy replies to the
               held-back prompts, refusals and first-token KL, undone (the mean over the search).

Then search quality per minute: after each trial of the search, the plan search.py would choose so far
(lowest KL among trials meeting the refusal target, else the lowest refusal), by elapsed time.
Every command runs as its own process, the way a user runs it.

    python bench/search_bench.py [--model DIR] [--trials 60]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY))

from demo.base_model import ADAPTER_DIRECTORY, default_cache_directory, refusing_model_directory  # noqa: E402

WORK_DIRECTORY = REPOSITORY / "bench" / "work" / "search"
MINUTES = (1, 2, 3, 5, 10)


def run(command: list[str]) -> float:
    """Wall seconds of one command, run as a user would; its output is kept out of the way."""
    started = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, *command], cwd=REPOSITORY, capture_output=True, text=True, check=False
    )
    if completed.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{completed.stderr[-3000:]}")
    return time.perf_counter() - started


def preview_agreement(written: dict, preview: dict) -> str:
    """evaluate.py --plan against --ablated on the written model: refusal counts and the KL."""
    counts = {
        report_name: {kind: report["models"]["ablated"][kind]["refusals"] for kind in ("harmful", "harmless")}
        for report_name, report in (("written", written), ("preview", preview))
    }
    kl_written, kl_preview = written["kl_divergence"]["mean"], preview["kl_divergence"]["mean"]
    return (
        f"preview vs written (suggested plan, held-out prompts): refusals {counts['preview']} vs "
        f"{counts['written']}; mean KL {kl_preview:.6g} vs {kl_written:.6g} "
        f"({abs(kl_preview - kl_written) / max(kl_written, 1e-12):.2%} apart)"
    )


def best_so_far(trials: list[dict], target: float) -> dict | None:
    done = [trial for trial in trials if trial["state"] == "COMPLETE"]
    if not done:
        return None
    rate = lambda trial: trial["harmful_refused"] / trial["harmful_prompts"]  # noqa: E731
    meeting = [trial for trial in done if rate(trial) <= target]
    if meeting:
        return min(meeting, key=lambda trial: (trial["kl_mean"], rate(trial)))
    return min(done, key=lambda trial: (rate(trial), trial["kl_mean"]))


def quality_rows(report: dict) -> list[str]:
    """The choice after 1, 2, 3, 5, 10 minutes of trials (by the trials' own times), up to the end of the search."""
    trials = sorted(report["trials"], key=lambda trial: trial["number"])
    ends, elapsed = [], 0.0
    for trial in trials:
        elapsed += trial.get("seconds", 0.0)
        ends.append(elapsed)
    rows = []
    for minutes in MINUTES:
        done = [trial for trial, end in zip(trials, ends) if end <= 60 * minutes]
        best = best_so_far(done, report["refusal_target"])
        if best is not None:
            rows.append(
                f"| {minutes} | {len(done)} | {best['number']} | "
                f"{best['harmful_refused']}/{best['harmful_prompts']} | "
                f"{best['harmless_refused']}/{best['harmless_prompts']} | {best['kl_mean']:.4g} |"
            )
        if ends[-1] <= 60 * minutes:
            break
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: the demo's)")
    parser.add_argument(
        "--trials", type=int, default=50, help="trials of the search (default: %(default)s, search.py's own)"
    )
    arguments = parser.parse_args()
    model = arguments.model or refusing_model_directory(default_cache_directory(), ADAPTER_DIRECTORY)
    shutil.rmtree(WORK_DIRECTORY, ignore_errors=True)
    WORK_DIRECTORY.mkdir(parents=True)
    measurements, suggested, searched = (
        WORK_DIRECTORY / name for name in ("m.pt", "suggested.yml", "plan.yml")
    )
    written = WORK_DIRECTORY / "written"
    run(["measure.py", "--model", str(model), "--output", str(measurements)])
    run(
        [
            "analyze.py",
            str(measurements),
            "--suggest",
            str(suggested),
            "--model",
            str(model),
            "--output",
            str(written),
        ]
    )

    write_seconds = run(["sharded_ablate.py", str(suggested)])
    evaluate_seconds = run(
        [
            "evaluate.py",
            "--model",
            str(model),
            "--ablated",
            str(written),
            "--json",
            str(WORK_DIRECTORY / "written.json"),
        ]
    )
    preview_seconds = run(
        [
            "evaluate.py",
            "--model",
            str(model),
            "--plan",
            str(suggested),
            "--json",
            str(WORK_DIRECTORY / "preview.json"),
        ]
    )
    search_seconds = run(
        [
            "search.py",
            "--model",
            str(model),
            "--measurements",
            str(measurements),
            "--plan",
            str(searched),
            "--output",
            str(WORK_DIRECTORY / "searched"),
            "--trials",
            str(arguments.trials),
            "--json",
            str(WORK_DIRECTORY / "trials.json"),
        ]
    )
    report = json.loads((WORK_DIRECTORY / "trials.json").read_text())
    trial_seconds = [trial["seconds"] for trial in report["trials"] if "seconds" in trial]
    per_trial = sum(trial_seconds) / len(trial_seconds)
    manual = write_seconds + evaluate_seconds

    print(
        f"model: {model}; {len(report['trials'])} trials; scoring prompts {report['settings']['scoring_prompts']}"
    )
    print("| what | wall time (s) | against one trial |")
    print("| --- | --- | --- |")
    print(
        f"| manual try: sharded_ablate.py + evaluate.py --ablated | {manual:.1f} | {manual / per_trial:.1f}x |"
    )
    print(
        f"|   of which evaluate.py --ablated | {evaluate_seconds:.1f} | {evaluate_seconds / per_trial:.1f}x |"
    )
    print(f"| preview: evaluate.py --plan | {preview_seconds:.1f} | {preview_seconds / per_trial:.1f}x |")
    print(f"| **one search.py trial** (mean) | **{per_trial:.2f}** | 1x |")
    print(
        f"| the whole search.py run ({len(report['trials'])} trials, model load included) | {search_seconds:.1f} | |"
    )
    print()
    print(
        preview_agreement(
            *(json.loads((WORK_DIRECTORY / name).read_text()) for name in ("written.json", "preview.json"))
        )
    )
    print()
    print("| minutes of trials | trials | chosen so far | harmful refused | harmless refused | KL mean |")
    print("| --- | --- | --- | --- | --- | --- |")
    print("\n".join(quality_rows(report)))


if __name__ == "__main__":
    main()
