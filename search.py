"""Find the ablation plan with forward passes: Optuna proposes plans, each is applied to the model in
memory (exactly as sharded_ablate.py would write it), scored on held-back prompts, and undone.

    python search.py --model MODEL --measurements M.pt --plan PLAN.yml --output EDITED_DIR \\
                     [--trials N] [--storage sqlite:///search.db] [--json trials.json] [--chart search.png]

The result is an ordinary plan file, commented with its measured figures and the Pareto front, for
sharded_ablate.py (or for a look with `evaluate.py --plan` first). See docs/search.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lib.core.arguments import non_negative_integer, positive_float, positive_integer
from lib.core.atomic import check_writable_destination
from lib.core.cli_options import add_model_loading_arguments, add_prompt_set_arguments
from lib.core.errors import UserError, run_cli, warn
from lib.core.prompts import (
    DEFAULT_HARMFUL_PROMPTS,
    DEFAULT_HARMLESS_PROMPTS,
    file_sha256,
    load_prompts,
    split_for_search,
)
from lib.evaluate.refusal_markers import DEFAULT_REFUSAL_MARKERS, load_refusal_detector

# Only light modules at the top: --help and usage errors answer before torch, transformers and Optuna
# load. The functions import the rest where they need it.
if TYPE_CHECKING:
    import optuna

    from lib.ablate.checkpoint import Checkpoint
    from lib.measure.measurements import Measurements
    from lib.search.engine import SearchSpace, TrialScorer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        "-m",
        required=True,
        metavar="MODEL",
        help="the model to abliterate: a local model directory or a hub id in the local cache",
    )
    parser.add_argument(
        "--measurements",
        required=True,
        type=Path,
        metavar="M.pt",
        help="measure.py's file for MODEL; one measurement serves every trial",
    )
    parser.add_argument(
        "--plan",
        required=True,
        type=Path,
        metavar="PLAN.yml",
        help="the plan file to write (must not exist: plans get hand edits)",
    )
    parser.add_argument(
        "--output",
        required=True,
        type=Path,
        metavar="EDITED_DIR",
        help="the plan's output directory, where sharded_ablate.py will write the edited model",
    )
    parser.add_argument(
        "--trials",
        type=positive_integer,
        default=50,
        metavar="N",
        help="trials in the study, resumed ones included (default: %(default)s)",
    )
    parser.add_argument(
        "--time-budget",
        type=positive_float,
        default=None,
        metavar="MINUTES",
        help="start no new trial after this many minutes; the best so far is written",
    )
    parser.add_argument(
        "--refusal-target",
        type=float,
        default=0.05,
        metavar="RATE",
        help="the chosen plan is the lowest KL among trials refusing at most this share of "
        "the harmful scoring prompts (default: %(default)s)",
    )
    parser.add_argument(
        "--data-harmful",
        type=Path,
        default=DEFAULT_HARMFUL_PROMPTS,
        metavar="FILE",
        help="the harmful measurement set; trials are scored on the prompts measure.py held back "
        "from it (default: data/harmful.txt)",
    )
    parser.add_argument(
        "--data-harmless",
        type=Path,
        default=DEFAULT_HARMLESS_PROMPTS,
        metavar="FILE",
        help="the harmless measurement set, likewise (default: data/harmless.txt)",
    )
    parser.add_argument(
        "--scoring-prompts",
        type=positive_integer,
        default=64,
        metavar="N",
        help="at most N held-back prompts of each set score a trial (default: %(default)s)",
    )
    parser.add_argument(
        "--reply-tokens",
        type=positive_integer,
        default=16,
        metavar="N",
        help="greedy reply length judged for refusal; refusals show in the opening (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size",
        type=non_negative_integer,
        default=0,
        metavar="N",
        help="prompts generated together; 0 (default) = automatic",
    )
    parser.add_argument(
        "--markers",
        type=Path,
        default=DEFAULT_REFUSAL_MARKERS,
        metavar="FILE",
        help="refusal marker phrases, one per line (default: data/refusal_markers.txt)",
    )
    parser.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help="Optuna storage, e.g. sqlite:///search.db: the trials are kept there, a killed "
        "search resumes from them, and optuna-dashboard URL shows them live",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of Optuna's sampler (default: %(default)s)")
    parser.add_argument(
        "--json", type=Path, default=None, metavar="FILE", help="also write every trial as JSON"
    )
    parser.add_argument(
        "--chart",
        type=Path,
        default=None,
        metavar="FILE.png",
        help="also draw refusal against KL for every trial, the front and the chosen plan",
    )
    add_prompt_set_arguments(parser)
    add_model_loading_arguments(parser, quantization_flags=("--quant",))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    check_arguments(arguments)
    detector = load_refusal_detector(arguments.markers, "--markers")
    from tqdm import tqdm

    from lib.ablate.checkpoint import open_checkpoint
    from lib.analyze.plan_suggestion import candidate_measurements, suggest_plan
    from lib.analyze.signal_metrics import analyze_measurements
    from lib.core.chat_format import require_chat_template, tokenize_chat_prompts
    from lib.core.loading import ModelLoadOptions, load_model, load_tokenizer
    from lib.measure.measurements import load_measurements
    from lib.search.engine import (
        PlanContext,
        ScoringPrompts,
        SearchSpace,
        TrialScorer,
        choose,
        completed,
        family_components,
        finished_count,
        run_trials,
        score_of,
        suggestion_trials,
    )

    measurements = load_measurements(arguments.measurements)
    checkpoint = open_checkpoint(arguments.model, "--model")
    context = PlanContext(
        checkpoint, measurements, arguments.model, arguments.measurements, arguments.plan, arguments.output
    )
    report = analyze_measurements(measurements)
    suggestion = suggest_plan(report, measurements.num_layers)
    if suggestion is None:
        raise UserError(f"{arguments.measurements}: no layer carries a refusal signal; nothing to search")
    space = SearchSpace.for_checkpoint(checkpoint, candidate_measurements(report, measurements.num_layers))
    starting_points = suggestion_trials(suggestion)
    context.resolution(starting_points[0])  # a plan error for this model shows now, before the model loads

    label = f"--model {arguments.model}"
    tokenizer = load_tokenizer(checkpoint.directory, label)
    use_chat_template = not arguments.no_chat_template
    if use_chat_template:
        require_chat_template(tokenizer, label)
    texts = scoring_texts(arguments, measurements)
    prompts = ScoringPrompts(
        *(
            tokenize_chat_prompts(tokenizer, texts[kind], arguments.system_prompt, use_chat_template)
            for kind in ("harmful", "harmless")
        )
    )
    settings = search_settings(arguments, checkpoint, texts, space)
    study = open_study(arguments, settings, starting_points)

    model = load_model(checkpoint.directory, ModelLoadOptions.from_arguments(arguments), label)
    print("scoring the unedited model ...", file=sys.stderr)
    scorer = TrialScorer(
        model, tokenizer, checkpoint, prompts, detector, arguments.reply_tokens, arguments.batch_size
    )
    deadline = None if arguments.time_budget is None else time.monotonic() + 60 * arguments.time_budget
    with tqdm(
        total=arguments.trials,
        initial=min(finished_count(study), arguments.trials),
        desc="trials",
        unit="trial",
        dynamic_ncols=True,
    ) as progress:

        def show(_trial: optuna.trial.FrozenTrial) -> None:
            best = choose(completed(study), arguments.refusal_target)
            if best is not None:
                score = score_of(best)
                progress.set_postfix_str(
                    f"best #{best.number}: refused {score.harmful_refusal:.1%}, KL {score.kl_mean:.3g}",
                    refresh=False,
                )
            progress.update()

        run_trials(study, space, context, scorer, arguments.trials, deadline, show)
    return write_outputs(arguments, study, scorer, settings, family_components(checkpoint))


def check_arguments(arguments: argparse.Namespace) -> None:
    """Everything the user can get wrong, before the slow parts."""
    if arguments.quantization:
        raise UserError(
            f"{arguments.quantization_flag} {arguments.quantization}: trials edit the loaded weights, "
            "which must not be quantised; load in bfloat16 (--dtype bfloat16) to save memory instead"
        )
    if not 0.0 <= arguments.refusal_target < 1.0:
        raise UserError(f"--refusal-target {arguments.refusal_target}: must be a rate in [0, 1)")
    if arguments.plan.exists():
        raise UserError(
            f"--plan {arguments.plan}: already exists; a plan may hold hand edits, so choose a new "
            "path or delete it"
        )
    check_writable_destination(arguments.plan, "--plan")
    for flag, path in (("--json", arguments.json), ("--chart", arguments.chart)):
        if path is not None:
            check_writable_destination(path, flag)
    if arguments.storage is not None and "://" not in arguments.storage:
        raise UserError(f"--storage {arguments.storage}: not a storage URL; use e.g. sqlite:///search.db")


def scoring_texts(arguments: argparse.Namespace, measurements: Measurements) -> dict[str, list[str]]:
    """The held-back prompts of each measurement set (all of them, with a warning, if none were held back)."""
    held_back_rule = (
        measurements.meta.get("held_back_for_search") if isinstance(measurements.meta, dict) else None
    )
    texts = {}
    for kind, path in (("harmful", arguments.data_harmful), ("harmless", arguments.data_harmless)):
        prompts = load_prompts(path, f"--data-{kind}")
        held_back = split_for_search(prompts)[1]
        if not held_back:
            raise UserError(
                f"--data-{kind} {path}: no prompt of it is held back for scoring (one in five by a hash "
                "of the text is); give a larger set"
            )
        texts[kind] = held_back[: arguments.scoring_prompts]
    if not held_back_rule:
        warn(
            f"{arguments.measurements}: measured on every prompt (older file or --use-all-prompts), so the "
            "scoring prompts were also measured: the figures are optimistic; measure again without "
            "--use-all-prompts for a clean score"
        )
    return texts


def search_settings(
    arguments: argparse.Namespace, checkpoint: Checkpoint, texts: dict[str, list[str]], space: SearchSpace
) -> dict:
    """What makes trials comparable: a study only resumes with exactly these."""
    from lib.search.engine import SCALE_RANGE

    prompt_digest = hashlib.sha256(json.dumps(texts, sort_keys=True).encode()).hexdigest()
    return {
        "model_directory": str(checkpoint.directory.resolve()),
        "measurements_sha256": file_sha256(arguments.measurements),
        "scoring_prompts": {kind: len(prompts) for kind, prompts in texts.items()},
        "scoring_prompts_sha256": prompt_digest,
        "reply_tokens": arguments.reply_tokens,
        "system_prompt": arguments.system_prompt,
        "chat_template": not arguments.no_chat_template,
        "dtype": arguments.dtype,
        "markers_sha256": file_sha256(arguments.markers),
        "seed": arguments.seed,
        "refusal_target": arguments.refusal_target,
        "search_space": {
            "measurements": [space.measurements.start, space.measurements.stop - 1],
            "layers": [0, space.num_layers - 1],
            "scale": list(SCALE_RANGE),
            "components": list(space.component_groups),
        },
    }


def open_study(arguments: argparse.Namespace, settings: dict, starting_points: list) -> optuna.Study:
    """A new study, or the one in --storage with the same settings (its finished trials count)."""
    import optuna

    from lib.search.engine import fail_interrupted_trials, finished_count, make_sampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    name = f"search-{Path(settings['model_directory']).name}-{digest}"
    try:
        existing = name in optuna.get_all_study_names(arguments.storage) if arguments.storage else False
        study = optuna.create_study(
            storage=arguments.storage,
            study_name=name,
            sampler=make_sampler(arguments.seed, arguments.refusal_target),
            directions=["minimize", "minimize"],
            load_if_exists=True,
        )
    except (ImportError, ValueError, optuna.exceptions.StorageInternalError) as error:
        raise UserError(f"--storage {arguments.storage}: cannot be opened ({error})") from None
    if existing:
        interrupted = fail_interrupted_trials(study)
        print(
            f"resuming study {name} from {arguments.storage}: {finished_count(study)} finished trials"
            + (f", {interrupted} interrupted ones marked failed" if interrupted else ""),
            file=sys.stderr,
        )
    else:
        study.set_user_attr("settings", settings)
        for point in starting_points:
            study.enqueue_trial(point.parameters())
    return study


def write_outputs(
    arguments: argparse.Namespace,
    study: optuna.Study,
    scorer: TrialScorer,
    settings: dict,
    available_components: frozenset[str],
) -> int:
    import optuna

    from lib.search.engine import choose, completed, pareto_front
    from lib.search.report import SearchOutcome, plan_text, report_document, save_search_chart, write_text

    finished = completed(study)
    chosen = choose(finished, arguments.refusal_target)
    if chosen is None:
        raise UserError(
            "no trial finished; nothing to write (see the errors above, or give more --time-budget)"
        )
    trials = study.get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
    )
    outcome = SearchOutcome(
        arguments.model,
        arguments.measurements,
        arguments.output,
        scorer.original,
        trials,
        pareto_front(finished),
        chosen,
        arguments.refusal_target,
        settings,
        available_components,
    )
    write_text(plan_text(outcome), arguments.plan)
    print(f"wrote {arguments.plan}: trial {chosen.number}")
    print("\n".join(line.removeprefix("# ") for line in plan_text(outcome).splitlines()[2:6]))
    if arguments.json is not None:
        write_text(json.dumps(report_document(outcome), indent=2) + "\n", arguments.json)
        print(f"wrote {arguments.json}")
    if arguments.chart is not None:
        save_search_chart(outcome, arguments.chart)
        print(f"wrote {arguments.chart}")
    print(
        f"next: python evaluate.py --model {arguments.model} --plan {arguments.plan}   (preview on held-out "
        f"prompts), then python sharded_ablate.py {arguments.plan}"
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
