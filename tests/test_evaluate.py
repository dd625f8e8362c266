"""evaluate.py: KL against direct computations, replies against transformers' generate, refusal counts,
the JSON report, one model in memory at a time, and bad input (one line, exit 2, no report)."""

from __future__ import annotations

import gc
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from evaluate import main
from lib.core.chat_format import pad_token_id_of, tokenize_chat_prompts
from lib.core.generation import DecodingSettings, generate_replies
from lib.core.loading import ModelLoadOptions, load_model, load_tokenizer
from lib.evaluate.evaluation import (
    HARMLESS,
    ORIGINAL,
    EvaluationSettings,
    ModelSource,
    PromptSet,
    score_model,
)
from lib.evaluate.refusal_markers import EMPTY_REPLY, load_refusal_detector
from tests.cli_helpers import error_line
from tests.fixtures import ALL_FAMILIES, build_tokenizer, damaged_copy
from tests.generation_helpers import reference_first_token_log_probabilities, reference_greedy_reply
from tests.measure_helpers import HARMFUL_PROMPTS, HARMLESS_PROMPTS

MAX_NEW_TOKENS = 4


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("evaluate-prompts")
    harmful, harmless = directory / "harmful.txt", directory / "harmless.txt"
    harmful.write_text("\n".join(HARMFUL_PROMPTS[:5]) + "\n")
    harmless.write_text("\n".join(HARMLESS_PROMPTS[:7]) + "\n")  # lengths from 1 to 17 words
    return harmful, harmless


def run_evaluate(prompt_files: tuple[Path, Path], report: Path, *arguments: str) -> dict:
    harmful, harmless = prompt_files
    status = main(
        [
            *arguments,
            "--harmful",
            str(harmful),
            "--harmless",
            str(harmless),
            "--max-new-tokens",
            str(MAX_NEW_TOKENS),
            "--json",
            str(report),
        ]
    )
    assert status == 0
    assert [path.name for path in report.parent.iterdir()] == [report.name]  # no temporary left behind
    return json.loads(report.read_text())


@pytest.fixture(scope="module")
def two_models_report(tiny_model, prompt_files, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The original llama fixture against one with different random weights, batches of 3 (padding)."""
    report = tmp_path_factory.mktemp("two-models") / "report.json"
    return run_evaluate(
        prompt_files,
        report,
        *("--model", str(tiny_model("llama")), "--ablated", str(tiny_model("llama", seed=1))),
        *("--batch-size", "3"),
    )


@pytest.fixture(scope="module")
def silent_model(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The llama fixture with its final norm zeroed: every logit is 0, so greedy decoding picks token id 0,
    the padding token, which decodes to nothing: every reply is empty."""
    directory = tmp_path_factory.mktemp("silent-llama")
    model = AutoModelForCausalLM.from_pretrained(tiny_model("llama"), dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(tiny_model("llama")).save_pretrained(directory)
    return directory


def test_kl_of_a_model_against_itself_is_zero(tiny_model, prompt_files, tmp_path: Path, capsys) -> None:
    model = str(tiny_model("llama"))
    report = run_evaluate(prompt_files, tmp_path / "report.json", "--model", model, "--ablated", model)
    divergence = report["kl_divergence"]
    assert divergence["per_prompt"] == [0.0] * len(HARMLESS_PROMPTS[:7])
    assert divergence["mean"] == divergence["max"] == 0.0
    original, ablated = report["models"]["original"], report["models"]["ablated"]
    assert original["replies"] == ablated["replies"]
    assert "mean 0, median 0, max 0" in capsys.readouterr().out


def test_kl_between_different_weights_matches_a_direct_computation(tiny_model, two_models_report) -> None:
    original, edited = tiny_model("llama"), tiny_model("llama", seed=1)
    expected = torch.tensor(
        [
            torch.nn.functional.kl_div(
                reference_first_token_log_probabilities(edited, prompt),  # log Q
                reference_first_token_log_probabilities(original, prompt),  # log P
                log_target=True,
                reduction="sum",
            ).item()
            for prompt in HARMLESS_PROMPTS[:7]
        ],
        dtype=torch.float64,
    )
    divergence = two_models_report["kl_divergence"]
    measured = torch.tensor(divergence["per_prompt"], dtype=torch.float64)
    assert (measured > 0).all()
    torch.testing.assert_close(measured, expected, rtol=1e-4, atol=1e-7)
    assert divergence["mean"] == pytest.approx(float(expected.mean()), rel=1e-4)
    assert divergence["max"] == pytest.approx(float(expected.max()), rel=1e-4)
    assert divergence["prompts"] == HARMLESS and divergence["unit"] == "nats"


def test_batched_replies_equal_transformers_generate_alone(tiny_model, two_models_report) -> None:
    for role, model in (("original", tiny_model("llama")), ("ablated", tiny_model("llama", seed=1))):
        for kind, prompts in (("harmful", HARMFUL_PROMPTS[:5]), ("harmless", HARMLESS_PROMPTS[:7])):
            replies = two_models_report["models"][role]["replies"][kind]
            assert [reply["prompt"] for reply in replies] == prompts
            for reply in replies:
                messages = [{"role": "user", "content": reply["prompt"]}]
                assert reply["reply"] == reference_greedy_reply(model, messages, MAX_NEW_TOKENS)


@pytest.mark.parametrize("model_type", ALL_FAMILIES)
def test_batched_generation_on_every_family(tiny_model, model_type: str) -> None:
    """Sliding-window and chunked attention, linear attention's recurrent state (Qwen3-Next, Qwen3.5),
    multimodal wrappers, soft-capped or scaled logits: left-padded batches give each prompt the reply
    and first-token distribution it gets alone."""
    directory = tiny_model(model_type)
    model = load_model(directory, ModelLoadOptions(device_map="cpu"), "--model")
    tokenizer = load_tokenizer(directory, "--model")
    prompts = [HARMLESS_PROMPTS[2], "hi", HARMLESS_PROMPTS[5], HARMLESS_PROMPTS[0]]
    generated = generate_replies(
        model,
        tokenizer,
        tokenize_chat_prompts(tokenizer, prompts),
        DecodingSettings(MAX_NEW_TOKENS),
        batch_size=4,
        keep_first_token_log_probabilities=True,
    )
    for index, prompt in enumerate(prompts):
        messages = [{"role": "user", "content": prompt}]
        assert generated.replies[index] == reference_greedy_reply(directory, messages, MAX_NEW_TOKENS)
        torch.testing.assert_close(
            generated.first_token_log_probabilities[index],
            reference_first_token_log_probabilities(directory, prompt),
            # float32 forwards of different lengths: linear attention's chunked recurrence rounds differently
            rtol=1e-4,
            atol=1e-4,
        )


def test_refusal_counts_follow_the_detector(two_models_report) -> None:
    detector = load_refusal_detector()
    assert two_models_report["refusal_markers"]["count"] == len(detector.markers)
    for model_report in two_models_report["models"].values():
        for kind, replies in model_report["replies"].items():
            verdicts = [detector.judge(reply["reply"]) for reply in replies]
            assert [reply["refusal"] for reply in replies] == [verdict.refused for verdict in verdicts]
            assert [reply["marker"] for reply in replies] == [verdict.reason for verdict in verdicts]
            refusals = sum(verdict.refused for verdict in verdicts)
            assert model_report[kind] == {
                "refusals": refusals,
                "prompts": len(replies),
                "refusal_rate": refusals / len(replies),
            }


def test_empty_replies_are_refusals_and_kl_to_uniform(
    tiny_model, silent_model: Path, prompt_files, tmp_path: Path, capsys
) -> None:
    original = tiny_model("llama")
    report = run_evaluate(
        prompt_files, tmp_path / "report.json", "--model", str(original), "--ablated", str(silent_model)
    )
    silent = report["models"]["ablated"]
    assert silent["harmful"]["refusal_rate"] == silent["harmless"]["refusal_rate"] == 1.0
    assert {reply["marker"] for kind in ("harmful", "harmless") for reply in silent["replies"][kind]} == {
        EMPTY_REPLY
    }
    table = capsys.readouterr().out
    assert "100.0% (5/5)" in table and "100.0% (7/7)" in table
    # Against a uniform distribution over V logits, KL(P || U) = log V - H(P).
    for prompt, measured in zip(HARMLESS_PROMPTS[:7], report["kl_divergence"]["per_prompt"]):
        log_p = reference_first_token_log_probabilities(original, prompt)
        expected = math.log(log_p.numel()) + float((log_p.exp() * log_p).sum())
        assert measured == pytest.approx(expected, rel=1e-5)  # float32 logits, padded batches


def test_one_model_alone_with_custom_markers(tiny_model, prompt_files, tmp_path: Path, capsys) -> None:
    markers = tmp_path / "markers.txt"
    markers.write_text("# nothing a four-token reply of this model contains\nabsolutely not\n")
    report_path = tmp_path / "out" / "report.json"
    report_path.parent.mkdir()
    report = run_evaluate(
        prompt_files,
        report_path,
        "--model",
        str(tiny_model("llama")),
        "--markers",
        str(markers),
        "--samples",
        "2",
    )
    assert list(report["models"]) == [ORIGINAL] and report["kl_divergence"] is None
    assert report["refusal_markers"]["file"] == str(markers) and report["refusal_markers"]["count"] == 1
    detector = load_refusal_detector(markers)
    for kind in ("harmful", "harmless"):
        for reply in report["models"][ORIGINAL]["replies"][kind]:
            assert reply["refusal"] == detector.judge(reply["reply"]).refused
    assert (
        report["settings"]["max_new_tokens"] == MAX_NEW_TOKENS and report["settings"]["decoding"] == "greedy"
    )
    output = capsys.readouterr().out
    assert "ablated" not in output and "KL" not in output
    assert output.count("[harmful ") == 2 and output.count("[harmless ") == 2


def _live_models(directory: Path) -> set[int]:
    gc.collect()
    return {
        id(candidate)
        for candidate in gc.get_objects()
        if isinstance(candidate, PreTrainedModel) and str(candidate.name_or_path) == str(directory)
    }


def test_the_model_is_released_after_scoring(tiny_model) -> None:
    directory = tiny_model("llama")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    prompts = HARMLESS_PROMPTS[:3]
    prompt_set = PromptSet(HARMLESS, Path("harmless.txt"), prompts, tokenize_chat_prompts(tokenizer, prompts))
    settings = EvaluationSettings(DecodingSettings(MAX_NEW_TOKENS), 0, ModelLoadOptions(), None, True)
    source = ModelSource(ORIGINAL, str(directory), directory, "--model")
    already_loaded = _live_models(directory)  # e.g. the references other tests keep
    scores = score_model(source, tokenizer, [prompt_set], load_refusal_detector(), settings)
    assert scores.harmless_first_token_log_probabilities.dtype == torch.float64
    assert scores.harmless_first_token_log_probabilities.device.type == "cpu"
    vocabulary = AutoConfig.from_pretrained(directory).vocab_size  # the full output, beyond the tokenizer
    assert scores.harmless_first_token_log_probabilities.shape == (3, vocabulary)
    # Nothing of the scored model survives, so the next model loads into the memory it gave back.
    assert _live_models(directory) <= already_loaded


# ---- progress --------------------------------------------------------------------------------

PROGRESS_PROMPTS = HARMLESS_PROMPTS[:6]
PROGRESS_TOKENS = 8


@dataclass
class ProgressWatch:
    """A forward pre-hook on a real model that notes generate_replies' live progress bar (found by its
    description) at every forward pass: the prompts' pass, then one per decoding step. It can fail one
    pass as CUDA does when out of memory."""

    description: str
    out_of_memory_at_pass: int | None = None
    passes: list[tuple[int, float]] = field(default_factory=list)  # (rows, the bar's count) per pass
    bar: tqdm | None = None

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.bar = next(bar for bar in list(tqdm._instances) if bar.desc == self.description)
        self.passes.append((kwargs["input_ids"].shape[0], self.bar.n))
        if len(self.passes) == self.out_of_memory_at_pass:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def _generate_watched(
    model_directory: Path, watch: ProgressWatch, batch_size: int, padding_ends_replies: bool = False
) -> list[str]:
    model = load_model(model_directory, ModelLoadOptions(device_map="cpu"), "--model")
    tokenizer = load_tokenizer(model_directory, "--model")
    if padding_ends_replies:  # as an end-of-turn token the model's authors set would
        model.generation_config.eos_token_id = pad_token_id_of(tokenizer)
    handle = model.register_forward_pre_hook(watch, with_kwargs=True)
    try:
        return generate_replies(
            model,
            tokenizer,
            tokenize_chat_prompts(tokenizer, PROGRESS_PROMPTS),
            DecodingSettings(PROGRESS_TOKENS),
            batch_size,
            description=watch.description,
        ).replies
    finally:
        handle.remove()


def _assert_finished(bar: tqdm, description: str) -> None:
    total = len(PROGRESS_PROMPTS) * PROGRESS_TOKENS
    assert (bar.desc, bar.total, bar.n) == (description, total, total)
    assert bar.postfix == f"{len(PROGRESS_PROMPTS)}/{len(PROGRESS_PROMPTS)} prompts done"


def test_progress_moves_at_every_decoding_step_of_a_single_batch(tiny_model) -> None:
    """One batch holds every prompt (as automatic batching often does): the bar, counted in decoding steps
    times rows, moves at every step, so that tqdm can show a rate and an ETA before the batch ends."""
    watch = ProgressWatch("harmless prompts")
    _generate_watched(tiny_model("llama"), watch, batch_size=len(PROGRESS_PROMPTS))
    rows = len(PROGRESS_PROMPTS)
    assert watch.passes == [(rows, step * rows) for step in range(PROGRESS_TOKENS)]
    _assert_finished(watch.bar, "harmless prompts")


def test_progress_of_a_batch_that_ends_early_jumps_to_its_end(silent_model: Path) -> None:
    """The silent model's first token (padding) ends every reply here: one forward pass, then the rest of
    the batch's steps at once."""
    watch = ProgressWatch("early end")
    replies = _generate_watched(silent_model, watch, len(PROGRESS_PROMPTS), padding_ends_replies=True)
    assert replies == [""] * len(PROGRESS_PROMPTS)
    assert watch.passes == [(len(PROGRESS_PROMPTS), 0)]
    _assert_finished(watch.bar, "early end")


def test_progress_of_a_batch_abandoned_for_out_of_memory_is_taken_back(tiny_model) -> None:
    """The automatic batch of 6 runs out of memory at its third pass (two steps shown) and is retried as
    two batches of 3, which start from where the abandoned one started."""
    watch = ProgressWatch("out of memory", out_of_memory_at_pass=3)
    _generate_watched(tiny_model("llama"), watch, batch_size=0)
    assert watch.passes[:4] == [(6, 0), (6, 6), (6, 12), (3, 0)]
    _assert_finished(watch.bar, "out of memory")


# ---- bad input -------------------------------------------------------------------------------


def _arguments(prompt_files: tuple[Path, Path], report: Path, *models: str, **overrides: str) -> list[str]:
    options = {"--harmful": str(prompt_files[0]), "--harmless": str(prompt_files[1]), "--json": str(report)}
    options.update(overrides)
    return [*models, *(item for pair in options.items() for item in pair)]


def _without_weights(model: Path, destination: Path) -> Path:
    """The model's config and tokenizer only: loading its weights would fail with a different error."""
    destination.mkdir()
    for path in model.iterdir():
        if not path.name.startswith("model") or (path.suffix == ".json" and "index" not in path.name):
            shutil.copy(path, destination / path.name)
    assert not list(destination.glob("*.safetensors"))
    return destination


@pytest.mark.parametrize("flag", ["--model", "--ablated"])
def test_missing_model(capsys, tiny_model, prompt_files, tmp_path: Path, flag: str) -> None:
    missing = tmp_path / "no-such-model"
    models = {"--model": str(tiny_model("llama")), "--ablated": str(tiny_model("llama")), flag: str(missing)}
    line = error_line(
        capsys, main, _arguments(prompt_files, tmp_path / "r.json", *(x for p in models.items() for x in p))
    )
    assert line.startswith(f"error: {flag} {missing}: ") and "not found" in line
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("difference", ["vocabulary", "chat template"])
def test_mismatched_tokenizers_are_refused_before_loading_weights(
    capsys, tiny_model, prompt_files, tmp_path: Path, difference: str
) -> None:
    original = _without_weights(tiny_model("llama"), tmp_path / "original")
    edited = _without_weights(tiny_model("llama"), tmp_path / "edited")
    tokenizer = build_tokenizer(vocab_size=300) if difference == "vocabulary" else build_tokenizer()
    if difference == "chat template":
        tokenizer.chat_template = tokenizer.chat_template.replace("assistant", "model")
    tokenizer.save_pretrained(edited)
    argv = _arguments(prompt_files, tmp_path / "r.json", "--model", str(original), "--ablated", str(edited))
    line = error_line(capsys, main, argv)
    assert line.startswith(f"error: --ablated {edited}: tokenizer does not match --model {original}'s")
    assert difference in line
    assert not (tmp_path / "r.json").exists()


def _edit_tokenizer_json(directory: Path, edit) -> None:
    path = directory / "tokenizer.json"
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))


def _mark_not_special(document: dict, content: str) -> None:
    next(token for token in document["added_tokens"] if token["content"] == content)["special"] = False


# Same vocabulary, other behaviour: each must be named before any weights are read.
TOKENIZER_JSON_EDITS = {
    # The reported case: refusals went from 87.5% to 0.0% because every reply decoded to "ĠI Ġcan't".
    "no decoder": (lambda document: document.update(decoder=None), "decoding (ids ["),
    "lowercasing normalizer": (
        lambda document: document.update(normalizer={"type": "Lowercase"}),
        "encoding (",
    ),
    "special token demoted": (
        lambda document: _mark_not_special(document, "<|end|>"),
        "special tokens (added token 4: '<|end|>' (special) vs '<|end|>' (not special))",
    ),
}


@pytest.mark.parametrize("edit", TOKENIZER_JSON_EDITS)
def test_tokenizers_that_encode_or_decode_differently_are_refused(
    capsys, tiny_model, prompt_files, tmp_path: Path, edit: str
) -> None:
    original = _without_weights(tiny_model("llama"), tmp_path / "original")
    edited = _without_weights(tiny_model("llama"), tmp_path / "edited")
    change, named = TOKENIZER_JSON_EDITS[edit]
    _edit_tokenizer_json(edited, change)
    argv = _arguments(prompt_files, tmp_path / "r.json", "--model", str(original), "--ablated", str(edited))
    line = error_line(capsys, main, argv)
    assert line.startswith(f"error: --ablated {edited}: tokenizer does not match --model {original}'s")
    assert named in line
    assert not (tmp_path / "r.json").exists()


def test_without_chat_template_the_templates_may_differ(tiny_model, prompt_files, tmp_path: Path) -> None:
    """--no-chat-template uses no template, so a pair whose templates differ is still comparable."""
    edited = shutil.copytree(tiny_model("llama", seed=1), tmp_path / "edited")
    tokenizer = build_tokenizer()
    tokenizer.chat_template = tokenizer.chat_template.replace("assistant", "model")
    tokenizer.save_pretrained(edited)
    (tmp_path / "out").mkdir()
    models = ("--model", str(tiny_model("llama")), "--ablated", str(edited))
    report = run_evaluate(prompt_files, tmp_path / "out" / "r.json", *models, "--no-chat-template")
    assert report["settings"]["chat_template"] is False and set(report["models"]) == {"original", "ablated"}


@pytest.mark.parametrize("flag", ["--harmful", "--harmless"])
def test_empty_prompt_file(capsys, tiny_model, prompt_files, tmp_path: Path, flag: str) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    argv = _arguments(
        prompt_files, tmp_path / "r.json", "--model", str(tiny_model("llama")), **{flag: str(empty)}
    )
    assert error_line(capsys, main, argv) == f"error: {flag} {empty}: contains no prompts"
    assert not (tmp_path / "r.json").exists()


def test_report_in_a_missing_directory(capsys, tiny_model, prompt_files, tmp_path: Path) -> None:
    report = tmp_path / "missing" / "r.json"
    line = error_line(capsys, main, _arguments(prompt_files, report, "--model", str(tiny_model("llama"))))
    assert line.startswith(f"error: --json {report}: directory ") and "does not exist" in line


@pytest.mark.parametrize("damage", ["truncated shard", "index cut short", "config.json cut short"])
def test_damaged_ablated_model_is_named_before_any_scoring(
    capsys, tiny_model, prompt_files, tmp_path: Path, damage: str
) -> None:
    original = tiny_model("llama")
    ablated, broken = damaged_copy(original, tmp_path / "damaged", damage)
    argv = _arguments(prompt_files, tmp_path / "r.json", "--model", str(original), "--ablated", str(ablated))
    line = error_line(capsys, main, argv)
    assert line.startswith(f"error: {broken}: "), line
    assert not (tmp_path / "r.json").exists()
