"""Bad input to measure.py: one `error:` line naming the file or flag, exit status 2, and no .pt file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from measure import main
from tests.cli_helpers import error_line
from tests.fixtures import DAMAGES, build_config, build_tokenizer, copy_without_chat_template, damaged_copy
from tests.measure_helpers import run_measure, write_prompt_files
from tests.scripts import IN_PROCESS_AND_AS_A_PROCESS, run_script


@pytest.fixture()
def workspace(tmp_path: Path) -> Path:
    write_prompt_files(tmp_path)
    (tmp_path / "out").mkdir()
    return tmp_path


def _arguments(workspace: Path, model: Path | str, **overrides: str) -> list[str]:
    options = {
        "--model": str(model),
        "--output": str(workspace / "out" / "m.pt"),
        "--data-harmful": str(workspace / "harmful.txt"),
        "--data-harmless": str(workspace / "harmless.txt"),
        **overrides,
    }
    return [item for pair in options.items() for item in pair]


def _no_output(workspace: Path) -> bool:
    return not any((workspace / "out").iterdir())


def test_missing_model_directory(capsys, workspace: Path) -> None:
    line = error_line(capsys, main, _arguments(workspace, workspace / "no-such-model"))
    assert line.startswith("error: --model ") and "not found" in line
    assert _no_output(workspace)


@pytest.mark.parametrize(
    "flag, name, content, message",
    [
        ("--data-harmful", "empty.txt", "\n\n", "contains no prompts"),
        ("--data-harmless", "latin1.txt", b"caf\xe9\n", "not UTF-8 text"),
        ("--data-harmful", "broken.json", '["a", ', "invalid JSON"),
        ("--data-harmless", "prompts.yaml", "- a\n", "unknown prompt-file type '.yaml'"),
        ("--data-harmful", "missing.txt", None, "file not found"),
    ],
)
def test_bad_prompt_files(
    capsys, tiny_model, workspace: Path, flag: str, name: str, content, message: str
) -> None:
    path = workspace / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    line = error_line(capsys, main, _arguments(workspace, tiny_model("llama"), **{flag: str(path)}))
    assert line.startswith(f"error: {flag} {path}: ") and message in line
    assert _no_output(workspace)


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_model_files_are_named(capsys, tiny_model, workspace: Path, damage: str) -> None:
    model, broken = damaged_copy(tiny_model("llama"), workspace / "damaged", damage)
    line = error_line(capsys, main, _arguments(workspace, model))
    assert line.startswith(f"error: {broken}: "), line
    if broken.suffix == ".json":
        assert "invalid JSON (" in line or "which is missing" in line
    assert _no_output(workspace)


def test_shard_that_safetensors_refuses_is_one_line(capsys, tiny_model, workspace: Path) -> None:
    """Bytes after the last tensor: transformers' loader refuses the shard with a SafetensorError."""
    model = Path(shutil.copytree(tiny_model("llama"), workspace / "padded"))
    with open(sorted(model.glob("model-*.safetensors"))[1], "ab") as handle:
        handle.write(b"trailing bytes")
    line = error_line(capsys, main, _arguments(workspace, model))
    assert line.startswith("error: ") and str(model) in line
    assert _no_output(workspace)


def test_model_without_chat_template(capsys, tiny_model, workspace: Path) -> None:
    model = copy_without_chat_template(tiny_model("llama"), workspace / "no-template")
    line = error_line(capsys, main, _arguments(workspace, model))
    assert (
        line.startswith(f"error: --model {model}: ")
        and "no chat template" in line
        and "--no-chat-template" in line
    )
    assert _no_output(workspace)
    measured = run_measure(model, workspace / "out" / "raw.pt", workspace, "--no-chat-template")
    assert measured["meta"]["chat_template"] is False
    assert measured["refuse_0"].any()  # raw prompts end in different tokens, so even L = 0 differs


@pytest.mark.parametrize("output", ["missing-directory/m.pt", "out"])
def test_unwritable_output(capsys, tiny_model, workspace: Path, output: str) -> None:
    line = error_line(
        capsys, main, _arguments(workspace, tiny_model("llama"), **{"--output": str(workspace / output)})
    )
    assert line.startswith("error: --output ")
    assert _no_output(workspace) and not (workspace / "missing-directory").exists()


def test_model_too_big_for_memory_stops_before_loading(capsys, workspace: Path) -> None:
    """A config-only checkpoint of ~130B parameters: the estimate alone must stop the run."""
    model = workspace / "huge"
    build_config(
        "llama",
        num_hidden_layers=40,
        hidden_size=16384,
        intermediate_size=53248,
        num_attention_heads=128,
        num_key_value_heads=8,
        head_dim=128,
        dtype="bfloat16",
    ).save_pretrained(model)
    build_tokenizer().save_pretrained(model)
    line = error_line(capsys, main, _arguments(workspace, model, **{"--device-map": "cpu"}))
    assert line.startswith(f"error: --model {model}: the weights need about ")
    assert "bfloat16" in line and "--quant-measure 4bit" in line and "--device-map auto" in line
    assert _no_output(workspace)


def test_output_without_room_stops_before_loading(capsys, workspace: Path) -> None:
    """A config-only model whose measurement file (6 vectors of 2^30 floats for each of 100001 residual
    layers) needs petabytes: the free-space check must stop the run before the model is touched."""
    model = workspace / "enormous"
    build_config("llama", num_hidden_layers=100_000, hidden_size=1 << 30).save_pretrained(model)
    build_tokenizer().save_pretrained(model)
    output = workspace / "out" / "m.pt"
    line = error_line(capsys, main, _arguments(workspace, model))
    assert line.startswith(f"error: --output {output}: needs ") and "safety margin but only" in line
    assert _no_output(workspace)


@pytest.mark.parametrize(
    "argv",
    [["--batch-size", "-1"], ["--max-prompts", "0"], ["--quant-measure", "3bit"], ["--device-map", "tpu"]],
)
def test_bad_flag_values_are_usage_errors(capsys, workspace: Path, argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(_arguments(workspace, workspace) + argv)
    assert exit_info.value.code == 2 and argv[0] in capsys.readouterr().err
    assert _no_output(workspace)


def test_flash_attention_falls_back_with_a_warning(capsys, tiny_model, workspace: Path) -> None:
    measured = run_measure(tiny_model("llama"), workspace / "out" / "m.pt", workspace, "--flash-attn")
    assert measured["layers"] == 4
    assert "warning: --flash-attn:" in capsys.readouterr().err


@IN_PROCESS_AND_AS_A_PROCESS
def test_script_help_and_exit_status(
    workspace: Path, capsys: pytest.CaptureFixture, as_a_process: bool
) -> None:
    help_run = run_script("measure", ["--help"], capsys, as_a_process=as_a_process)
    assert help_run.status == 0
    for flag in (
        "--model",
        "-m",
        "--output",
        "-o",
        "--batch-size",
        "--quant-measure",
        "-q",
        "--flash-attn",
        "--data-harmful",
        "--data-harmless",
        "--projected",
        "--dtype",
        "--device-map",
        "--max-prompts",
        "--system-prompt",
        "--no-chat-template",
    ):
        assert flag in help_run.out
    failed = run_script(
        "measure", _arguments(workspace, workspace / "absent"), capsys, as_a_process=as_a_process
    )
    assert failed.status == 2 and failed.err.startswith("error: --model ") and _no_output(workspace)
