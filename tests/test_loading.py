"""Shared model loading: flags, memory estimate against the real footprint, decoder layers everywhere."""

from __future__ import annotations

import argparse

import pytest
import torch
from transformers import AutoConfig

from lib.core.errors import UserError
from lib.core.loading import (
    ModelLoadOptions,
    add_model_loading_arguments,
    decoder_layers,
    estimate_weight_bytes,
    load_model,
    quantization_description,
    text_config,
)
from tests.fixtures import ALL_FAMILIES


def test_flags_parse_into_options_with_the_callers_quantisation_flag() -> None:
    parser = argparse.ArgumentParser()
    add_model_loading_arguments(parser, quantization_flags=("--quant-measure", "-q"))
    options = ModelLoadOptions.from_arguments(
        parser.parse_args(["-q", "8bit", "--dtype", "bfloat16", "--device-map", "cpu", "--flash-attn"])
    )
    assert options == ModelLoadOptions("bfloat16", "cpu", "8bit", True, "--quant-measure")
    assert ModelLoadOptions.from_arguments(parser.parse_args([])) == ModelLoadOptions(
        quantization_flag="--quant-measure"
    )
    evaluate_parser = argparse.ArgumentParser()
    add_model_loading_arguments(evaluate_parser)
    assert (
        ModelLoadOptions.from_arguments(evaluate_parser.parse_args(["--quant", "4bit"])).quantization
        == "4bit"
    )


@pytest.mark.parametrize("quantization", [None, "4bit", "8bit"])
def test_weight_estimate_matches_the_loaded_footprint(tiny_model, quantization: str | None) -> None:
    directory = tiny_model("gemma3_text")
    model = load_model(directory, ModelLoadOptions(device_map="cpu", quantization=quantization), "--model")
    estimate = estimate_weight_bytes(AutoConfig.from_pretrained(directory), torch.float32, quantization)
    assert estimate == pytest.approx(model.get_memory_footprint(), rel=0.1)
    assert quantization_description(model) == (
        None
        if quantization is None
        else {"4bit": "bitsandbytes 4bit nf4", "8bit": "bitsandbytes 8bit"}[quantization]
    )


def test_dtype_flag_overrides_the_checkpoint(tiny_model) -> None:
    model = load_model(tiny_model("llama"), ModelLoadOptions(dtype="bfloat16"), "--model")
    assert model.dtype == torch.bfloat16


@pytest.mark.parametrize("model_type", ALL_FAMILIES)
def test_decoder_layers_found_in_every_family(tiny_model, model_type: str) -> None:
    model = load_model(tiny_model(model_type), ModelLoadOptions(), "--model")
    layers = decoder_layers(model)
    assert len(layers) == text_config(model.config).num_hidden_layers == 4
    if model_type == "gemma3":
        assert layers is model.model.language_model.layers


def test_cuda_device_map_without_a_gpu_is_a_user_error(tiny_model) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(UserError, match="--device-map cuda: no CUDA device"):
        load_model(tiny_model("llama"), ModelLoadOptions(device_map="cuda"), "--model")
