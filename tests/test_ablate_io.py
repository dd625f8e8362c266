"""The tensor-by-tensor safetensors reader and writer against the reference implementation."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lib.ablate.safetensors_stream import BackgroundWriter, HeaderEntry, queue_shard, read_header, read_tensor
from lib.core.errors import UserError
from tests.ablate_helpers import write_raw_safetensors


def reference_file(path: Path) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "bf16": torch.randn(7, 5, generator=generator).to(torch.bfloat16),
        "f16": torch.randn(3, generator=generator).to(torch.float16),
        "f32": torch.randn(2, 3, 4, generator=generator),
        "f64": torch.randn(5, generator=generator, dtype=torch.float64),
        "i64": torch.arange(-3, 6),
        "u8": torch.arange(0, 250, 7, dtype=torch.uint8),
        "flag": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    save_file(tensors, path, metadata={"format": "pt", "note": "kept"})
    return tensors


def test_reader_matches_the_reference(tmp_path: Path) -> None:
    path = tmp_path / "reference.safetensors"
    tensors = reference_file(path)
    header = read_header(path)
    assert header.metadata == {"format": "pt", "note": "kept"}
    assert [stored.begin for stored in header.tensors] == sorted(stored.begin for stored in header.tensors)
    with safe_open(path, framework="pt") as handle:
        for stored in header.tensors:
            loaded = read_tensor(stored)
            assert loaded.dtype == tensors[stored.name].dtype and loaded.shape == tensors[stored.name].shape
            assert (
                loaded.view(-1)
                .view(torch.uint8)
                .equal(handle.get_tensor(stored.name).view(-1).view(torch.uint8))
            )


def test_writer_output_loads_in_the_reference_and_copies_bytes_exactly(tmp_path: Path) -> None:
    source = tmp_path / "reference.safetensors"
    tensors = reference_file(source)
    stored = {tensor.name: tensor for tensor in read_header(source).tensors}
    replaced = torch.full((7, 5), 3.0, dtype=torch.bfloat16)
    order = sorted(stored, key=lambda name: stored[name].begin)
    entries = [
        HeaderEntry(name, stored[name].dtype, stored[name].shape, stored[name].nbytes) for name in order
    ]
    counted: list[int] = []
    with BackgroundWriter(counted.append) as writer:
        shard = queue_shard(writer, tmp_path / "written.safetensors", entries, {"format": "pt"})
        for name in order:
            if name == "bf16":
                shard.write_tensor(replaced)
            else:
                shard.copy_range(source, stored[name].begin, stored[name].nbytes)
        shard.close()
    written = tmp_path / "written.safetensors"
    assert sum(counted) == written.stat().st_size
    (header_length,) = struct.unpack("<Q", written.read_bytes()[:8])
    assert header_length % 8 == 0
    with safe_open(written, framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
        for name, tensor in tensors.items():
            expected = replaced if name == "bf16" else tensor
            assert (
                handle.get_tensor(name).view(-1).view(torch.uint8).equal(expected.view(-1).view(torch.uint8))
            )


def test_a_short_write_is_an_error_not_a_corrupt_file(tmp_path: Path) -> None:
    entries = [HeaderEntry("a", "F32", (4,), 16)]
    with pytest.raises(RuntimeError, match="header announces"), BackgroundWriter() as writer:
        shard = queue_shard(writer, tmp_path / "short.safetensors", entries, None)
        shard.write_tensor(torch.zeros(2))
        shard.close()


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x01", "shorter than its 8-byte header"),
        (struct.pack("<Q", 10**12) + b"{}", "impossible"),
        (struct.pack("<Q", 4) + b"nope", "not JSON"),
    ],
)
def test_malformed_files_are_user_errors(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        read_header(path)


def two_tensors(**changes: Any) -> dict[str, Any]:
    """A valid header of two F32 [2] tensors, `a` at [0, 8] and `b` at [8, 16], with entries replaced."""
    return {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
        **changes,
    }


@pytest.mark.parametrize(
    "header, data_bytes, message",
    [
        (
            two_tensors(b={"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}),
            16,
            "tensor b overlaps tensor a in the file (data_offsets [4, 12] and [0, 8])",
        ),
        (
            two_tensors(b={"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}),
            20,
            "4 bytes before tensor b belong to no tensor",
        ),
        (two_tensors(), 20, "the last 4 bytes of the file belong to no tensor"),
        (two_tensors(), 12, "tensor b ends 4 bytes after the end of the file"),
        (
            two_tensors(a={"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}),
            16,
            "tensor a is F32 of shape [3], which takes 12 bytes, but its data_offsets [0, 8] hold 8",
        ),
        (
            two_tensors(a={"dtype": "F128", "shape": [2], "data_offsets": [0, 8]}),
            16,
            "tensor a has dtype 'F128'; known:",
        ),
        (two_tensors(a={"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}), 16, "a list of sizes >= 0"),
        (two_tensors(a={"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}), 16, "0 <= begin <= end"),
        (two_tensors(a={"dtype": "F32", "shape": [2]}), 16, "tensor a has data_offsets None"),
        (two_tensors(a=[0, 8]), 16, "tensor a: its header entry must be an object"),
        (two_tensors(__metadata__={"format": 1}), 16, "__metadata__ must map names to strings"),
        ([], 0, "header is not a JSON object"),
    ],
    ids=[
        "overlap",
        "gap",
        "trailing-bytes",
        "truncated",
        "byte-length",
        "dtype",
        "shape",
        "reversed-offsets",
        "missing-offsets",
        "entry-not-object",
        "metadata",
        "not-an-object",
    ],
)
def test_headers_the_reference_refuses_are_user_errors(
    tmp_path: Path, header: Any, data_bytes: int, message: str
) -> None:
    path = write_raw_safetensors(tmp_path / "bad.safetensors", header, bytes(data_bytes))
    with pytest.raises(SafetensorError):
        safe_open(path, framework="pt")
    with pytest.raises(UserError, match=f"^{path}: ") as refused:
        read_header(path)
    assert message in str(refused.value)
