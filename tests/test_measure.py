"""measure.py against transformers' own forward pass: exact means and variances at every layer."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as transformers_logging

from lib.core.batching import length_sorted_order
from lib.core.chat_format import pad_token_id_of, tokenize_chat_prompts
from lib.core.errors import UserError
from lib.core.loading import decoder_layers
from lib.core.prompts import SEARCH_HOLD_BACK_RULE, split_for_search
from lib.measure.measurements import load_measurements
from lib.measure.residual_capture import common_prefix_length, measure_last_token_residuals
from tests.fixtures import ALL_FAMILIES, build_prequantized_fixture
from tests.measure_helpers import (
    HARMFUL_PROMPTS,
    HARMLESS_PROMPTS,
    assert_close_relative,
    cosine,
    direct_last_token_residuals,
    run_measure,
)

TOLERANCE = 1e-4
# Every family, and gpt_oss twice: its fixture's 16-token sliding window is shorter than the prompts,
# so batches run whole prompts; with a 512-token window they reuse the shared prefix's cache. Hybrid
# families (Qwen3-Next, Qwen3.5) keep a recurrent state in their linear attention layers.
FAMILIES = [(model_type, {}) for model_type in ALL_FAMILIES] + [("gpt_oss", {"sliding_window": 512})]


def _assert_matches_direct(measured: dict, harmful: torch.Tensor, harmless: torch.Tensor, label: str) -> None:
    num_layers = measured["layers"]
    assert harmful.shape[1] == num_layers + 1
    for layer in range(num_layers + 1):
        for name, direct in (("harmful", harmful), ("harmless", harmless)):
            assert_close_relative(
                measured[f"{name}_{layer}"], direct[:, layer].mean(0), TOLERANCE, f"{label} {name}_{layer}"
            )
            assert_close_relative(
                measured[f"{name}_var_{layer}"],
                direct[:, layer].var(0),
                TOLERANCE,
                f"{label} {name}_var_{layer}",
                # The residuals are float32: their variance is known to about 1e-7 of their square.
                scale_floor=float(direct[:, layer].abs().max()) ** 2 * 1e-4,
            )
        refusal = harmful[:, layer].mean(0) - harmless[:, layer].mean(0)
        # A difference of means, each known to TOLERANCE of its own size (float32 residuals).
        means_scale = float(harmful[:, layer].mean(0).abs().max())
        assert_close_relative(
            measured[f"refuse_{layer}"],
            refusal,
            TOLERANCE,
            f"{label} refuse_{layer}",
            scale_floor=means_scale,
        )


@pytest.mark.parametrize(
    "model_type, options",
    FAMILIES,
    ids=lambda value: (
        value
        if isinstance(value, str)
        else "-".join(f"{key}{item}" for key, item in value.items()) or "default"
    ),
)
def test_means_equal_direct_forward_for_every_batch_size(
    tiny_model, tmp_path: Path, model_type: str, options: dict
) -> None:
    directory = tiny_model(model_type, **options)
    harmful = direct_last_token_residuals(directory, HARMFUL_PROMPTS)
    harmless = direct_last_token_residuals(directory, HARMLESS_PROMPTS)
    for batch_size in (1, 3, 8, 0):
        measured = run_measure(
            directory, tmp_path / f"b{batch_size}.pt", tmp_path, "--batch-size", str(batch_size)
        )
        _assert_matches_direct(measured, harmful, harmless, f"{model_type} --batch-size {batch_size}")
        # L = 0 sees only the last token's embedding, the same for every chat-templated prompt.
        assert not measured["refuse_0"].any() and not measured["refusenorm_0"].any()
        for layer in range(1, measured["layers"] + 1):
            direction = measured[f"refusenorm_{layer}"]
            assert cosine(direction, measured[f"refuse_{layer}"]) == pytest.approx(1.0, abs=1e-6)
            assert float(direction.norm()) == pytest.approx(1.0, abs=1e-6)


def test_by_default_one_prompt_in_five_is_held_back_for_the_plan_search(tiny_model, tmp_path: Path) -> None:
    directory = tiny_model("llama")
    measured_prompts = {
        kind: split_for_search(prompts)[0]
        for kind, prompts in (("harmful", HARMFUL_PROMPTS), ("harmless", HARMLESS_PROMPTS))
    }
    held_back = {
        kind: split_for_search(prompts)[1]
        for kind, prompts in (("harmful", HARMFUL_PROMPTS), ("harmless", HARMLESS_PROMPTS))
    }
    assert all(held_back.values()) and all(
        measured_prompts.values()
    )  # the fixture prompts exercise both sides
    measured = run_measure(directory, tmp_path / "m.pt", tmp_path, hold_back=True)
    assert measured["meta"]["prompt_counts"] == {kind: len(texts) for kind, texts in measured_prompts.items()}
    assert measured["meta"]["held_back_for_search"] == SEARCH_HOLD_BACK_RULE
    harmful = direct_last_token_residuals(directory, measured_prompts["harmful"])
    harmless = direct_last_token_residuals(directory, measured_prompts["harmless"])
    _assert_matches_direct(measured, harmful, harmless, "held back")
    assert run_measure(directory, tmp_path / "all.pt", tmp_path)["meta"]["held_back_for_search"] is None


def test_last_position_is_the_last_layer_output_before_the_final_norm(tiny_model, tmp_path: Path) -> None:
    directory = tiny_model("llama")
    measured = run_measure(directory, tmp_path / "m.pt", tmp_path, "--batch-size", "4")
    last = measured["layers"]
    before_norm = direct_last_token_residuals(directory, HARMFUL_PROMPTS)[:, last]
    model = AutoModelForCausalLM.from_pretrained(directory)
    with torch.no_grad():
        after_norm = model.model.norm(
            before_norm.float()
        ).double()  # what transformers' hidden_states[-1] holds
    assert_close_relative(measured[f"harmful_{last}"], before_norm.mean(0), TOLERANCE, "L = N")
    assert not torch.allclose(measured[f"harmful_{last}"].double(), after_norm.mean(0), rtol=1e-2, atol=1e-2)


def test_file_layout_meta_and_loader(tiny_model, tmp_path: Path) -> None:
    directory = tiny_model("llama")
    measured = run_measure(
        directory, tmp_path / "m.pt", tmp_path, "--max-prompts", "5", "--system-prompt", "Be brief."
    )
    num_layers = measured["layers"]
    expected_keys = {"layers", "meta"} | {
        f"{prefix}_{layer}"
        for layer in range(num_layers + 1)
        for prefix in ("harmful", "harmless", "refuse", "refusenorm", "harmful_var", "harmless_var")
    }
    assert set(measured) == expected_keys
    assert all(
        measured[key].dtype == torch.float32 and measured[key].shape == (64,)
        for key in expected_keys - {"layers", "meta"}
    )
    meta = measured["meta"]
    assert meta["model"] == str(directory) and meta["model_type"] == "llama"
    assert meta["hidden_size"] == 64 and meta["num_layers"] == num_layers == 4
    assert meta["dtype"] == "float32" and meta["quantization"] is None
    assert meta["prompt_counts"] == {"harmful": 5, "harmless": 5}
    assert len(meta["prompt_sha256"]["harmful"]) == 64 and meta["system_prompt"] == "Be brief."
    assert meta["projected"] is False and meta["created"] and meta["tool_version"]
    loaded = load_measurements(tmp_path / "m.pt")
    assert loaded.num_layers == 4 and sorted(loaded.layers) == [0, 1, 2, 3, 4]
    assert torch.allclose(loaded.direction(2), measured["refusenorm_2"])
    with pytest.raises(UserError, match="layer 0 has no refusal direction"):
        loaded.direction(0)
    assert [path.name for path in tmp_path.glob("*.pt*")] == ["m.pt"]


def test_system_prompt_changes_the_measurement(tiny_model, tmp_path: Path) -> None:
    directory = tiny_model("llama")
    plain = run_measure(directory, tmp_path / "a.pt", tmp_path, "--max-prompts", "4")
    system = run_measure(
        directory, tmp_path / "b.pt", tmp_path, "--max-prompts", "4", "--system-prompt", "Be kind."
    )
    assert not torch.allclose(plain["harmful_2"], system["harmful_2"])


def test_projected_direction_is_orthogonal_to_the_harmless_mean(tiny_model, tmp_path: Path) -> None:
    measured = run_measure(tiny_model("llama"), tmp_path / "p.pt", tmp_path, "--projected")
    assert measured["meta"]["projected"] is True
    for layer in range(1, measured["layers"] + 1):
        direction, harmless = measured[f"refusenorm_{layer}"].double(), measured[f"harmless_{layer}"].double()
        refusal = measured[f"refuse_{layer}"].double()
        unit_harmless = harmless / harmless.norm()
        expected = refusal - (refusal @ unit_harmless) * unit_harmless
        assert abs(float(direction @ unit_harmless)) < 1e-5
        assert_close_relative(direction, expected / expected.norm(), 1e-5, f"refusenorm_{layer}")


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_bitsandbytes_measurement_on_cpu_agrees_with_full_precision(
    tiny_model, tmp_path: Path, quantization: str
) -> None:
    # gemma3_text: its sandwich norms keep a random tiny model stable enough that 4-bit weight
    # error does not snowball through the layers (it does in a random llama: cosine 0.69 at L = 4).
    directory = tiny_model("gemma3_text")
    full = run_measure(directory, tmp_path / "full.pt", tmp_path)
    quantized = run_measure(directory, tmp_path / "q.pt", tmp_path, "--quant-measure", quantization)
    assert quantized["meta"]["quantization"].startswith(f"bitsandbytes {quantization}")
    for layer in range(1, full["layers"] + 1):
        similarity = cosine(full[f"refusenorm_{layer}"], quantized[f"refusenorm_{layer}"])
        assert similarity > 0.9, f"{quantization} layer {layer}: cosine {similarity:.3f}"
        assert not torch.equal(full[f"harmful_{layer}"], quantized[f"harmful_{layer}"])  # really quantised


@pytest.mark.parametrize("model_type, quant_method", [("gpt_oss", "mxfp4"), ("llama", "fp8")])
def test_prequantized_checkpoint_loads_and_measures_exactly(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, model_type: str, quant_method: str
) -> None:
    directory = build_prequantized_fixture(model_type, tmp_path_factory.mktemp(quant_method), quant_method)
    # --quant-measure on an already quantised checkpoint is ignored with a warning, not a crash.
    measured = run_measure(directory, tmp_path / "m.pt", tmp_path, "--batch-size", "3", "-q", "4bit")
    assert quant_method in measured["meta"]["quantization"]
    harmful = direct_last_token_residuals(directory, HARMFUL_PROMPTS)
    harmless = direct_last_token_residuals(directory, HARMLESS_PROMPTS)
    _assert_matches_direct(measured, harmful, harmless, quant_method)


def _out_of_memory_above(limit: int, attempted: list[int]):
    """A forward pre-hook that fails like CUDA does when a batch is larger than `limit` prompts."""

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        batch = (args[0] if args else kwargs["hidden_states"]).shape[0]
        attempted.append(batch)
        if batch > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    return hook


def test_automatic_batch_size_backs_off_on_out_of_memory(tiny_model) -> None:
    """Out-of-memory inside the real forward pass halves an automatic batch and loses no prompt."""
    directory = tiny_model("llama")
    model = AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    token_ids = tokenize_chat_prompts(tokenizer, HARMFUL_PROMPTS)
    attempted: list[int] = []
    handle = decoder_layers(model)[0].register_forward_pre_hook(
        _out_of_memory_above(2, attempted), with_kwargs=True
    )
    try:
        statistics = measure_last_token_residuals(model, token_ids, 0, pad_token_id_of(tokenizer))
        assert max(attempted) > 2 and attempted[-1] <= 2 and statistics.count == len(HARMFUL_PROMPTS)
        direct = direct_last_token_residuals(directory, HARMFUL_PROMPTS)
        assert_close_relative(statistics.mean, direct.mean(0), TOLERANCE, "mean after back-off")
        with pytest.raises(UserError, match="--batch-size 4: out of memory"):
            measure_last_token_residuals(model, token_ids, 4, pad_token_id_of(tokenizer))
    finally:
        handle.remove()


def _recording_lengths(lengths: list[int]):
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        lengths.append((args[0] if args else kwargs["hidden_states"]).shape[1])

    return hook


# qwen3_next: its linear attention layers would fold the padding after the prefix into their state.
@pytest.mark.parametrize(
    "model_type, options, shares", [("llama", {}, True), ("gpt_oss", {}, False), ("qwen3_next", {}, False)]
)
def test_shared_prefix_is_computed_once(tiny_model, model_type: str, options: dict, shares: bool) -> None:
    directory = tiny_model(model_type, **options)
    model = AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    token_ids = tokenize_chat_prompts(tokenizer, HARMFUL_PROMPTS)
    prefix = common_prefix_length(token_ids)
    assert tokenizer.decode(token_ids[0][:prefix]) == "<bos><|start|>user\n"
    lengths: list[int] = []
    handle = decoder_layers(model)[0].register_forward_pre_hook(_recording_lengths(lengths), with_kwargs=True)
    try:
        shared = measure_last_token_residuals(model, token_ids, 4, pad_token_id_of(tokenizer))
    finally:
        handle.remove()
    longest_per_batch = [
        max(len(token_ids[index]) for index in batch)
        for batch in (
            length_sorted_order(token_ids)[start : start + 4] for start in range(0, len(token_ids), 4)
        )
    ]
    assert lengths[0] == prefix
    # gpt_oss's 16-token sliding window is shorter than prefix + prompt, so it runs whole prompts.
    # qwen3_next keeps a recurrent state in its linear attention layers: whole prompts too.
    expected = [length - prefix for length in longest_per_batch] if shares else longest_per_batch
    assert lengths[1:] == expected
    whole = measure_last_token_residuals(model, token_ids, 4, pad_token_id_of(tokenizer), share_prefix=False)
    assert_close_relative(shared.mean, whole.mean, TOLERANCE, "shared prefix vs whole prompts")


# The project's pytest configuration ignores FutureWarning; this test opts back in, so that a deprecated
# transformers API fails here before a routine upgrade removes it.
@pytest.mark.filterwarnings("error::FutureWarning")
@pytest.mark.parametrize("model_type", ["llama", "gemma3"])
def test_shared_prefix_cache_uses_no_deprecated_transformers_api(
    tiny_model, model_type: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tiny_model(model_type)
    model = AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    token_ids = tokenize_chat_prompts(tokenizer, HARMFUL_PROMPTS)
    monkeypatch.setattr(logging.getLogger("transformers"), "propagate", True)  # to reach caplog
    transformers_logging.warning_once.cache_clear()  # a notice an earlier test logged is logged again
    lengths: list[int] = []
    handle = decoder_layers(model)[0].register_forward_pre_hook(_recording_lengths(lengths), with_kwargs=True)
    try:
        measure_last_token_residuals(model, token_ids, 4, pad_token_id_of(tokenizer))
    finally:
        handle.remove()
    # The prefix ran once and the batches ran on its cache: the cache went in and came out.
    assert lengths[0] == common_prefix_length(token_ids)
    assert max(lengths[1:]) < max(len(ids) for ids in token_ids)
    assert [record.getMessage() for record in caplog.records if "deprecated" in record.getMessage()] == []


def test_common_prefix_keeps_every_last_token() -> None:
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5]]) == 3
    assert common_prefix_length([[1, 2], [1, 2, 3]]) == 1  # [1, 2] keeps its last token
    assert common_prefix_length([[7], [7]]) == 0
