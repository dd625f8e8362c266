"""Benchmark sharded_ablate.py: wall time and peak memory against two baselines measured in the same run.

    python bench/ablate_bench.py [--repeats 3] [--work bench/work]

A bf16 Llama-style model of about 1.5 GB in 4 shards is built once under --work (random weights,
hidden size 2048, 12 layers), with a measurement file, and every layer is put in the plan. Each
contender runs as its own process; peak memory is that process's maximum resident set size
(`wait4`), wall time includes interpreter start-up. Contenders:

* `cp -r` of the model directory (page cache only, nothing forced to disk);
* the same copy followed by fsync of every file, the durability sharded_ablate.py provides;
* interpreter start-up: the imports a run of sharded_ablate.py makes (torch, safetensors and the
  tool's modules; since the imports moved after argument parsing, `import sharded_ablate` alone no
  longer loads them);
* the whole-shard approach of older tools: `load_file` a shard, edit it, `save_file` it;
* sharded_ablate.py itself.

Targets (BENCHMARKS.md): wall time <= 2 x plain copy + start-up; peak memory <= 1/4 of whole-shard.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY_ROOT))

HIDDEN_SIZE = 2048
INTERMEDIATE_SIZE = 5632
NUM_LAYERS = 12
VOCAB_SIZE = 32000
SHARD_BYTES = 400_000_000

# Older tools: whole shard in memory, edit the writers of each planned layer, save the whole shard.
WHOLE_SHARD_SCRIPT = """
import json, shutil, sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
source, output, measurements = Path(sys.argv[1]), Path(sys.argv[2]), torch.load(sys.argv[3], weights_only=True)
output.mkdir()
index = json.loads((source / "model.safetensors.index.json").read_text())
for shard in sorted(set(index["weight_map"].values())):
    state = load_file(source / shard)
    for name in list(state):
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            layer = int(name.split(".")[2])
            direction = torch.nn.functional.normalize(measurements[f"refusenorm_{layer}"].float(), dim=0)
            weight = state[name].float()
            state[name] = (weight - torch.outer(direction, direction @ weight)).to(state[name].dtype)
    save_file(state, output / shard, metadata={"format": "pt"})
    del state
for path in source.iterdir():
    if not path.name.endswith(".safetensors"):
        shutil.copy(path, output / path.name)
"""

DURABLE_COPY_SCRIPT = """
import os, shutil, sys
from pathlib import Path
source, output = Path(sys.argv[1]), Path(sys.argv[2])
shutil.copytree(source, output)
for path in output.iterdir():
    descriptor = os.open(path, os.O_RDONLY)
    os.fsync(descriptor)
    os.close(descriptor)
"""


def build_model(directory: Path) -> None:
    """A random bf16 Llama of about 1.5 GB, saved by transformers in 4 shards."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.fixtures import build_tokenizer

    config = LlamaConfig(
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=VOCAB_SIZE,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    model.save_pretrained(directory, max_shard_size=SHARD_BYTES)
    build_tokenizer().save_pretrained(directory)


def build_inputs(work: Path) -> None:
    """The model (once), the measurement file and the plan. Runs in its own process, see main()."""
    from tests.ablate_helpers import write_plan
    from tests.measurement_files import write_measurements

    model = work / "model"
    if not (model / "config.json").is_file():
        shutil.rmtree(model, ignore_errors=True)
        build_model(model)
    write_measurements(work / "measurements.pt", HIDDEN_SIZE, NUM_LAYERS)
    write_plan(
        work / "plan.yml",
        {
            "model": str(model),
            "measurements": str(work / "measurements.pt"),
            "output": str(work / "ablated"),
            "ablate": [{"layer": f"0-{NUM_LAYERS - 1}"}],
        },
    )


def measure(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak resident megabytes) of one process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPOSITORY_ROOT, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"benchmark command failed: {' '.join(command)}")
    return elapsed, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per contender; the median is reported")
    parser.add_argument(
        "--work",
        type=Path,
        default=REPOSITORY_ROOT / "bench" / "work",
        help="where the model and outputs are written (about 3 GB)",
    )
    parser.add_argument("--prepare-only", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    work = arguments.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    if arguments.prepare_only:
        build_inputs(work)
        return
    # A child's peak RSS counts what it inherited at fork: this process must stay small, so the
    # inputs (torch, transformers, a 1.5 GB model in memory) are built in a process of their own.
    subprocess.run([sys.executable, __file__, "--work", str(work), "--prepare-only"], check=True)
    model, plan = work / "model", work / "plan.yml"
    output = work / "ablated"
    contenders = {
        "plain copy (cp -r)": ["cp", "-r", str(model), str(output)],
        "plain copy + fsync": [sys.executable, "-c", DURABLE_COPY_SCRIPT, str(model), str(output)],
        "interpreter start-up": [
            sys.executable,
            "-c",
            "import sharded_ablate, torch, tqdm, lib.ablate.writing, lib.ablate.companion_files, "
            "lib.ablate.record, lib.ablate.output_guard, lib.ablate.resolution, lib.measure.measurements",
        ],
        "whole-shard (load_file/save_file)": [
            sys.executable,
            "-c",
            WHOLE_SHARD_SCRIPT,
            str(model),
            str(output),
            str(work / "measurements.pt"),
        ],
        "sharded_ablate.py": [sys.executable, "sharded_ablate.py", str(plan)],
    }
    subprocess.run(
        ["cat", *map(str, model.glob("*.safetensors"))], stdout=subprocess.DEVNULL, check=True
    )  # warm the cache
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
    for _ in range(arguments.repeats):
        for name, command in contenders.items():
            shutil.rmtree(output, ignore_errors=True)
            results[name].append(measure(command))
    shutil.rmtree(output, ignore_errors=True)

    size = sum(path.stat().st_size for path in model.glob("*.safetensors")) / 1e9
    shards = len(list(model.glob("*.safetensors")))
    print(
        f"model: {size:.2f} GB bf16 in {shards} shards, {NUM_LAYERS} layers all in the plan; "
        f"median of {arguments.repeats} runs; {os.cpu_count()} CPUs\n"
    )
    print("| contender | wall time (s) | peak RSS (MB) |")
    print("|---|---|---|")
    median = {
        name: (statistics.median(t for t, _ in runs), statistics.median(m for _, m in runs))
        for name, runs in results.items()
    }
    for name, (seconds, megabytes) in median.items():
        print(f"| {name} | {seconds:.2f} | {megabytes:.0f} |")
    ours_time, ours_memory = median["sharded_ablate.py"]
    startup = median["interpreter start-up"][0]
    for copy in ("plain copy (cp -r)", "plain copy + fsync"):
        budget = 2 * median[copy][0] + startup
        print(
            f"\nwall time vs 2 x {copy} + start-up = {budget:.2f} s: {ours_time / budget:.2f} of the budget"
        )
    whole_memory = median["whole-shard (load_file/save_file)"][1]
    startup_memory = median["interpreter start-up"][1]
    print(
        f"peak memory vs whole-shard: {ours_memory / whole_memory:.3f} "
        f"(above start-up: {(ours_memory - startup_memory) / (whole_memory - startup_memory):.3f})"
    )


if __name__ == "__main__":
    main()
