"""Benchmark measure.py's residual capture against the conventional generate()-based measurement.

Same run, same model, same prompts, same token ids, same batch size:

  measure       lib.measure.residual_capture: length-sorted left-padded batches, plain forward passes of the
                base model, the prompts' shared prefix computed once, hooks keeping the last-token
                residual of each layer, float64 Welford.
  conventional  what llm-abliteration style tools do: batches in file order, padded on the left,
                `generate(max_new_tokens=1, output_hidden_states=True, return_dict_in_generate=True)`,
                means taken from the returned hidden states of the first step.
  conventional-sorted  the same with measure's length-sorted batches: a diagnostic row that splits
                the gain into what sorting gives and what avoiding generate() gives.

Each approach runs in its own subprocess, so the peak memory of one never hides the other's:
the process peak (`ru_maxrss`, includes loading the model) and the peak during the measurement
itself (VmHWM after resetting it through /proc/self/clear_refs once the model is loaded).

The model (~150M parameters, bf16, several safetensors shards, random weights) is built once with
tests/fixtures.build_fixture under bench/work/ (git-ignored).

    python bench/measure_bench.py [--prompts 512] [--batch-size 32] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY))

from lib.core.batching import length_sorted_order  # noqa: E402
from lib.core.chat_format import left_pad, pad_token_id_of, tokenize_chat_prompts  # noqa: E402
from lib.core.loading import ModelLoadOptions, load_model, load_tokenizer  # noqa: E402
from lib.core.prompts import DEFAULT_HARMFUL_PROMPTS, DEFAULT_HARMLESS_PROMPTS, load_prompts  # noqa: E402
from lib.measure.residual_capture import common_prefix_length, measure_last_token_residuals  # noqa: E402

WORK_DIRECTORY = REPOSITORY / "bench" / "work"
MODEL_DIRECTORY = WORK_DIRECTORY / "llama-150m-bf16"
# ~150M parameters: 17 layers of hidden 768 / MLP 3072, written as shards of at most 100 MB.
MODEL_SETTINGS = dict(
    num_hidden_layers=17,
    hidden_size=768,
    intermediate_size=3072,
    num_attention_heads=12,
    num_key_value_heads=4,
    head_dim=64,
    initializer_range=0.02,
)
SHARD_BYTES = 100_000_000
APPROACHES = ("measure", "conventional", "conventional-sorted")


def build_model() -> Path:
    if (MODEL_DIRECTORY / "config.json").is_file():
        return MODEL_DIRECTORY
    from tests.fixtures import build_fixture

    WORK_DIRECTORY.mkdir(parents=True, exist_ok=True)
    return build_fixture(
        "llama", MODEL_DIRECTORY, dtype=torch.bfloat16, max_shard_size=SHARD_BYTES, **MODEL_SETTINGS
    )


def benchmark_prompts(harmful_file: Path, harmless_file: Path, count: int) -> dict[str, list[str]]:
    """`count` prompts, half harmful and half harmless, in file order."""
    return {
        "harmful": load_prompts(harmful_file, "--harmful")[: count // 2],
        "harmless": load_prompts(harmless_file, "--harmless")[: count - count // 2],
    }


# ---- the two approaches (run inside a child process) ---------------------------------------------


def conventional_means(model, token_ids: list[list[int]], batch_size: int, pad_token_id: int) -> torch.Tensor:
    """Per-layer means the conventional way: generate one token per batch, read its hidden states."""
    means, count = None, 0
    for start in range(0, len(token_ids), batch_size):
        batch = left_pad(token_ids[start : start + batch_size], pad_token_id)
        output = model.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=1,
            do_sample=False,
            output_hidden_states=True,
            return_dict_in_generate=True,
            pad_token_id=pad_token_id,
        )
        last_token = torch.stack([layer[:, -1, :].float() for layer in output.hidden_states[0]])
        batch_count = last_token.shape[1]
        count += batch_count
        batch_mean = last_token.mean(dim=1)
        means = batch_mean if means is None else means + (batch_mean - means) * (batch_count / count)
    return means


def padded_tokens(token_ids: list[list[int]], batch_size: int, approach: str) -> int:
    """Tokens a run computes, padding included: each batch is as long as its longest prompt.

    measure computes the prefix all prompts share once and then only each prompt's remainder.
    """
    order = length_sorted_order(token_ids) if approach == "measure" else range(len(token_ids))
    shared = common_prefix_length(token_ids) if approach == "measure" else 0
    lengths = [len(token_ids[index]) - shared for index in order]
    batches = [lengths[start : start + batch_size] for start in range(0, len(lengths), batch_size)]
    return shared + sum(len(batch) * max(batch) for batch in batches)


def _reset_peak_memory() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)
        return True
    except OSError:
        return False


def _peak_since_reset() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def run_child(approach: str, arguments: argparse.Namespace) -> None:
    torch.set_grad_enabled(False)
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    model = load_model(MODEL_DIRECTORY, ModelLoadOptions(device_map="cpu"), f"--model {MODEL_DIRECTORY}")
    tokenizer = load_tokenizer(MODEL_DIRECTORY, f"--model {MODEL_DIRECTORY}")
    prompts = benchmark_prompts(arguments.harmful, arguments.harmless, arguments.prompts)
    token_ids = {name: tokenize_chat_prompts(tokenizer, texts) for name, texts in prompts.items()}
    pad = pad_token_id_of(tokenizer)
    phase_peak_available = _reset_peak_memory()
    start, cpu_start = time.perf_counter(), time.process_time()
    if approach == "measure":
        means = {
            name: measure_last_token_residuals(model, ids, arguments.batch_size, pad, name).mean
            for name, ids in token_ids.items()
        }
    else:
        if approach == "conventional-sorted":
            token_ids = {
                name: [ids[index] for index in length_sorted_order(ids)] for name, ids in token_ids.items()
            }
        means = {
            name: conventional_means(model, ids, arguments.batch_size, pad) for name, ids in token_ids.items()
        }
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    torch.save({name: mean.float() for name, mean in means.items()}, arguments.means_output)
    print(
        json.dumps(
            {
                "seconds": seconds,
                "cpu_seconds": cpu_seconds,
                "prompts": sum(len(ids) for ids in token_ids.values()),
                "tokens": sum(len(ids) for group in token_ids.values() for ids in group),
                "padded_tokens": sum(
                    padded_tokens(ids, arguments.batch_size, approach) for ids in token_ids.values()
                ),
                "process_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "phase_peak_bytes": _peak_since_reset() if phase_peak_available else None,
            }
        )
    )


# ---- the parent: build, run both, report ---------------------------------------------------------


def run_approach(approach: str, arguments: argparse.Namespace) -> tuple[dict, dict[str, torch.Tensor]]:
    means_output = WORK_DIRECTORY / f"means-{approach}.pt"
    command = [
        sys.executable,
        __file__,
        "--child",
        approach,
        "--prompts",
        str(arguments.prompts),
        "--batch-size",
        str(arguments.batch_size),
        "--harmful",
        str(arguments.harmful),
        "--harmless",
        str(arguments.harmless),
        "--means-output",
        str(means_output),
        "--threads",
        str(arguments.threads),
    ]
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    process_seconds = time.perf_counter() - started
    if completed.returncode != 0:
        sys.exit(f"{approach} failed:\n{completed.stderr[-3000:]}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    return {**result, "process_seconds": process_seconds}, torch.load(means_output)


def run_measure_script(arguments: argparse.Namespace) -> float:
    """Wall seconds of `python measure.py` itself on the same prompts, start-up and model load included,
    with as many torch threads as the other runs."""
    prompts = benchmark_prompts(arguments.harmful, arguments.harmless, arguments.prompts)
    files = {name: WORK_DIRECTORY / f"prompts-{name}.txt" for name in prompts}
    for name, path in files.items():
        path.write_text("\n".join(prompts[name]) + "\n")
    command = [
        sys.executable,
        str(REPOSITORY / "measure.py"),
        "--model",
        str(MODEL_DIRECTORY),
        "--output",
        str(WORK_DIRECTORY / "measure-script.pt"),
        "--data-harmful",
        str(files["harmful"]),
        "--data-harmless",
        str(files["harmless"]),
        "--use-all-prompts",
        "--batch-size",
        str(arguments.batch_size),
        "--device-map",
        "cpu",
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": str(arguments.threads or torch.get_num_threads())}
    started = time.perf_counter()
    completed = subprocess.run(
        command, capture_output=True, text=True, check=False, env=environment, cwd=REPOSITORY
    )
    if completed.returncode != 0:
        sys.exit(f"measure.py failed:\n{completed.stderr[-3000:]}")
    return time.perf_counter() - started


def parameter_count(shard: Path) -> int:
    from safetensors import safe_open

    with safe_open(shard, "pt") as handle:
        return sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())


def best_run(runs: list[dict]) -> dict:
    """The run with the least CPU time, and the largest peak memory seen in any run (memory varies little)."""
    fastest = min(runs, key=lambda run: run["cpu_seconds"])
    peaks = {
        key: max((run[key] or 0) for run in runs) or None
        for key in ("process_peak_bytes", "phase_peak_bytes")
    }
    return {**fastest, **peaks}


def _mib(size: int | None) -> str:
    return "n/a" if size is None else f"{size / (1 << 20):.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--prompts", type=int, default=512, help="number of prompts, half harmful, half harmless"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="batch size of both approaches")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs of each approach, interleaved; the fastest counts (other work shares the CPU)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads in each run (default 1: CPU time then measures work, not contention)",
    )
    parser.add_argument("--harmful", type=Path, default=DEFAULT_HARMFUL_PROMPTS)
    parser.add_argument("--harmless", type=Path, default=DEFAULT_HARMLESS_PROMPTS)
    parser.add_argument("--child", choices=APPROACHES, help=argparse.SUPPRESS)
    parser.add_argument("--means-output", type=Path, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        run_child(arguments.child, arguments)
        return

    directory = build_model()
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory)
    shards = sorted(directory.glob("*.safetensors"))
    parameters = sum(parameter_count(shard) for shard in shards)
    print(
        f"model: {directory.relative_to(REPOSITORY)} (llama, {parameters / 1e6:.0f}M parameters, "
        f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, bf16, {len(shards)} shards); "
        f"torch threads per run: {arguments.threads or torch.get_num_threads()}"
    )
    runs: dict[str, list[dict]] = {approach: [] for approach in APPROACHES}
    means = {}
    script_seconds = []
    for repeat in range(arguments.repeats):
        for approach in APPROACHES:
            result, means[approach] = run_approach(approach, arguments)
            runs[approach].append(result)
            print(f"  run {repeat + 1} {approach}: {json.dumps(result)}")
        script_seconds.append(run_measure_script(arguments))
        print(f"  run {repeat + 1} measure.py (the script, start-up included): {script_seconds[-1]:.2f} s")
    results = {approach: best_run(approach_runs) for approach, approach_runs in runs.items()}

    measured, conventional = results["measure"], results["conventional"]
    # generate()'s hidden_states[N] is after the final norm, so compare the positions both define alike.
    agreement = max(
        float(
            (means["measure"][name][:-1] - means["conventional"][name][:-1])
            .norm(dim=-1)
            .div(means["conventional"][name][:-1].norm(dim=-1))
            .max()
        )
        for name in means["measure"]
    )
    rows = [
        (
            "approach",
            "prompts/CPU-second",
            "prompts/s (wall)",
            "measurement-phase peak RSS",
            "process peak RSS",
        ),
        ("---",) * 5,
    ]
    for approach in APPROACHES:
        result = results[approach]
        rows.append(
            (
                approach,
                f"{result['prompts'] / result['cpu_seconds']:.2f}",
                f"{result['prompts'] / result['seconds']:.2f}",
                _mib(result["phase_peak_bytes"]),
                _mib(result["process_peak_bytes"]),
            )
        )
    print()
    print(
        f"{measured['prompts']} prompts ({measured['tokens']} tokens), batch size {arguments.batch_size}, "
        f"best of {arguments.repeats} runs each"
    )
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(
        "throughput ratio measure/conventional: "
        f"{conventional['cpu_seconds'] / measured['cpu_seconds']:.2f}x "
        f"by CPU time, {conventional['seconds'] / measured['seconds']:.2f}x by wall time "
        f"(tokens computed incl. padding: {measured['padded_tokens']} vs {conventional['padded_tokens']}, "
        f"ratio {conventional['padded_tokens'] / measured['padded_tokens']:.2f})"
    )
    sorted_conventional = results["conventional-sorted"]
    print(
        f"of which from sorting alone (conventional-sorted vs conventional, CPU time): "
        f"{conventional['cpu_seconds'] / sorted_conventional['cpu_seconds']:.2f}x; "
        f"from the shared prefix and plain forward passes instead of generate() (measure vs "
        f"conventional-sorted): "
        f"{sorted_conventional['cpu_seconds'] / measured['cpu_seconds']:.2f}x"
    )
    for key in ("phase_peak_bytes", "process_peak_bytes"):
        if measured[key] and conventional[key]:
            print(
                f"{key.replace('_bytes', '')} ratio measure/conventional: "
                f"{measured[key] / conventional[key]:.2f}"
            )
    print(f"largest relative difference of the means at L = 0..N-1 (bf16 batching noise): {agreement:.2e}")
    conventional_process = min(run["process_seconds"] for run in runs["conventional"])
    print(
        f"whole process, start-up and model load included (fastest run): measure.py {min(script_seconds):.2f} s, "
        f"conventional {conventional_process:.2f} s: {conventional_process / min(script_seconds):.2f}x "
        f"(bench child for measure {min(run['process_seconds'] for run in runs['measure']):.2f} s)"
    )


if __name__ == "__main__":
    main()
