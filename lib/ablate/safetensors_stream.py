"""Safetensors files read and written one tensor at a time.

The format: an 8-byte little-endian header length, a JSON header mapping each tensor name to its
dtype, shape and `data_offsets` (relative to the end of the header) plus an optional string-only
`__metadata__`, then the raw little-endian tensor bytes, contiguous and without holes. The header
is padded with spaces to a multiple of 8 bytes, as the reference implementation does, so that
every tensor stays aligned when the largest element types come first.

Reading parses the header only, and checks it as strictly as the reference implementation does
(the tensors must tile the data section exactly); a tensor's bytes are read on demand
(`read_tensor`, checked against `safe_open` in the tests) or copied file-to-file in the kernel
(`ShardSink.copy_range`), so untouched tensors never pass through Python and come out bit-identical. Writing emits the header first and then each tensor's bytes in
turn, so no shard is ever held in memory; the writes run in a background thread (`BackgroundWriter`)
so that the disk works while the next tensor is being edited.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import math
import os
import struct
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from lib.core.errors import UserError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
ELEMENT_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "C64": 8,
}
FLOATING_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})

_HEADER_LENGTH_BYTES = 8
_HEADER_ALIGNMENT = 8
_MAX_HEADER_BYTES = 100_000_000  # the reference implementation's limit
_COPY_CHUNK_BYTES = 64 << 20
_MAX_QUEUED_TENSORS = 2
_M_MMAP_THRESHOLD = -3  # mallopt parameter number, from glibc's malloc.h
_MMAP_THRESHOLD_BYTES = 1 << 20


@dataclass(frozen=True)
class StoredTensor:
    """A tensor as it lies in a safetensors file: absolute byte range [begin, end)."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class ShardHeader:
    path: Path
    metadata: dict[str, str] | None
    tensors: tuple[StoredTensor, ...]  # in file order


def read_header(path: Path) -> ShardHeader:
    """Parse a safetensors header; a malformed file is a UserError naming it."""
    path = Path(path)
    file_size = path.stat().st_size
    with open(path, "rb") as handle:
        raw_length = handle.read(_HEADER_LENGTH_BYTES)
        if len(raw_length) < _HEADER_LENGTH_BYTES:
            raise UserError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (header_length,) = struct.unpack("<Q", raw_length)
        if header_length > min(_MAX_HEADER_BYTES, file_size - _HEADER_LENGTH_BYTES):
            raise UserError(f"{path}: not a safetensors file (header length {header_length} is impossible)")
        try:
            header = json.loads(handle.read(header_length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise UserError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: not a safetensors file (header is not a JSON object)")
    data_start = _HEADER_LENGTH_BYTES + header_length
    metadata = _metadata(path, header.pop("__metadata__", None))
    tensors = [_stored_tensor(path, name, entry, data_start) for name, entry in header.items()]
    tensors.sort(key=lambda tensor: (tensor.begin, tensor.end))
    _check_data_tiled(path, tensors, data_start, file_size)
    return ShardHeader(path, metadata, tuple(tensors))


def _metadata(path: Path, metadata: object) -> dict[str, str] | None:
    is_text_map = isinstance(metadata, dict) and all(isinstance(value, str) for value in metadata.values())
    if metadata is not None and not is_text_map:
        raise UserError(f"{path}: the header's __metadata__ must map names to strings, got {metadata!r}")
    return metadata


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _stored_tensor(path: Path, name: str, entry: object, data_start: int) -> StoredTensor:
    """One header entry, checked as the reference implementation checks it; where it lies among the
    others is `_check_data_tiled`'s part."""
    if not isinstance(entry, dict):
        raise UserError(f"{path}: tensor {name}: its header entry must be an object, got {entry!r}")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in ELEMENT_SIZES:
        raise UserError(f"{path}: tensor {name} has dtype {dtype!r}; known: {', '.join(ELEMENT_SIZES)}")
    if not isinstance(shape, list) or not all(map(_is_count, shape)):
        raise UserError(f"{path}: tensor {name} has shape {shape!r}; a shape is a list of sizes >= 0")
    if (
        not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets)))
        or offsets[0] > offsets[1]
    ):
        raise UserError(
            f"{path}: tensor {name} has data_offsets {offsets!r}; expected [begin, end] with "
            "0 <= begin <= end"
        )
    begin, end = offsets
    expected_bytes = math.prod(shape) * ELEMENT_SIZES[dtype]
    if end - begin != expected_bytes:
        raise UserError(
            f"{path}: tensor {name} is {dtype} of shape {shape}, which takes {expected_bytes} "
            f"bytes, but its data_offsets [{begin}, {end}] hold {end - begin}; "
            "the header is corrupt"
        )
    return StoredTensor(name, path, dtype, tuple(shape), data_start + begin, data_start + end)


def _check_data_tiled(path: Path, tensors: list[StoredTensor], data_start: int, file_size: int) -> None:
    """The tensors, in file order, must cover the data section exactly: no overlap, no gap, nothing after.

    The reference implementation refuses any other layout. Overlaps are looked for first: tensors
    sharing bytes would carry an edit of one into the other, and the message names both.
    """
    for previous, tensor in itertools.pairwise(tensors):
        if tensor.begin < previous.end:
            raise UserError(
                f"{path}: tensor {tensor.name} overlaps tensor {previous.name} in the file "
                f"(data_offsets {_offsets(tensor, data_start)} and "
                f"{_offsets(previous, data_start)}); the header is corrupt"
            )
    position = data_start
    for tensor in tensors:
        if tensor.begin > position:
            raise UserError(
                f"{path}: {tensor.begin - position} bytes before tensor {tensor.name} belong to "
                f"no tensor (data_offsets {_offsets(tensor, data_start)}); the header is corrupt"
            )
        position = tensor.end
    if position > file_size:
        raise UserError(
            f"{path}: tensor {tensors[-1].name} ends {position - file_size} bytes after the end "
            "of the file (truncated file?)"
        )
    if position < file_size:
        raise UserError(
            f"{path}: the last {file_size - position} bytes of the file belong to no tensor; "
            "the header is corrupt"
        )


def _offsets(tensor: StoredTensor, data_start: int) -> list[int]:
    """The tensor's data_offsets as the header writes them (relative to the data section)."""
    return [tensor.begin - data_start, tensor.end - data_start]


def return_freed_tensors_to_the_system() -> None:
    """Make glibc give every large freed buffer back to the system at once.

    By default glibc raises its mmap threshold (up to 32 MiB) after large buffers are freed, so
    later tensors of that size come from the heap and stay resident after being freed: a streaming
    run would keep the memory of several tensors it no longer holds. A fixed threshold prevents that.
    Elsewhere than glibc this does nothing.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)


def read_tensor(stored: StoredTensor) -> torch.Tensor:
    """Load one tensor into private memory with plain reads.

    Not through a memory map (as `safe_open` does): mapped pages count towards the process's memory
    on top of the private copy that editing in place makes, doubling the cost of every edited tensor.
    """
    if stored.dtype not in DTYPES:
        raise UserError(
            f"{stored.path}: tensor {stored.name} has dtype {stored.dtype}, which cannot be loaded here"
        )
    buffer = torch.empty(stored.nbytes, dtype=torch.uint8)
    view = memoryview(buffer.numpy())
    with open(stored.path, "rb", buffering=0) as handle:
        handle.seek(stored.begin)
        while view:
            count = handle.readinto(view)
            if not count:
                raise UserError(f"{stored.path}: ends inside tensor {stored.name} (truncated file?)")
            view = view[count:]
    return buffer.view(DTYPES[stored.dtype]).reshape(stored.shape)


@dataclass(frozen=True)
class HeaderEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def encode_header(entries: Sequence[HeaderEntry], metadata: dict[str, str] | None) -> bytes:
    """The length prefix and the space-padded JSON header for tensors laid out in `entries` order."""
    header: dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    for entry in entries:
        header[entry.name] = {
            "dtype": entry.dtype,
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % _HEADER_ALIGNMENT)
    return struct.pack("<Q", len(encoded)) + encoded


class ShardSink:
    """The data section of a shard being written: raw byte ranges and tensors, in header order."""

    def __init__(self, descriptor: int, on_bytes: Callable[[int], None]) -> None:
        self.descriptor = descriptor
        self._on_bytes = on_bytes
        self.bytes_written = 0
        self._kernel_copy_works = True

    def write_bytes(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        while view:
            written = os.write(self.descriptor, view[:_COPY_CHUNK_BYTES])
            view = view[written:]
            self._account(written)

    def write_tensor(self, tensor: torch.Tensor) -> None:
        """The raw little-endian bytes of a CPU tensor."""
        self.write_bytes(tensor.detach().contiguous().view(torch.uint8).flatten().numpy())

    def copy_range(self, source: Path, begin: int, length: int) -> None:
        """Copy bytes [begin, begin + length) of `source`, inside the kernel when the filesystems allow."""
        with open(source, "rb") as handle:
            source_descriptor = handle.fileno()
            position, end = begin, begin + length
            while position < end:
                count = min(_COPY_CHUNK_BYTES, end - position)
                copied = self._kernel_copy(source_descriptor, count, position)
                if copied:
                    self._account(copied)
                else:
                    data = os.pread(source_descriptor, count, position)
                    if not data:
                        raise RuntimeError(f"{source}: ends before byte {end}")
                    self.write_bytes(data)
                    copied = len(data)
                position += copied

    def _kernel_copy(self, source_descriptor: int, count: int, position: int) -> int:
        if not self._kernel_copy_works:
            return 0
        try:
            return os.copy_file_range(source_descriptor, self.descriptor, count, position)
        except OSError:  # e.g. across filesystems on older kernels: copy through user space instead
            self._kernel_copy_works = False
            return 0

    def _account(self, count: int) -> None:
        self.bytes_written += count
        self._on_bytes(count)


class BackgroundWriter:
    """Background threads perform every file write, so disk I/O overlaps the math.

    One writer thread runs the writes in submission order; a second thread makes each finished file
    durable (fsync) and closes it while the writer goes on with the next one. At most
    `_MAX_QUEUED_TENSORS` computed tensors wait to be written; beyond that the caller blocks, which
    bounds memory to a few tensors. A failed write is raised in the caller at its next submission or
    at the end; on any failure the queue is dropped and open files closed.
    """

    def __init__(self, on_bytes: Callable[[int], None] = lambda count: None) -> None:
        self.on_bytes = on_bytes
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-syncer")
        self._pending: deque[Future] = deque()
        self._queued_tensors: deque[Future] = deque()
        self._syncs: deque[Future] = deque()
        self.open_descriptors: set[int] = set()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, error_type: type | None, error: BaseException | None, traceback: object) -> None:
        self._writer.shutdown(wait=True, cancel_futures=error_type is not None)
        self._syncer.shutdown(wait=True)
        try:
            while error_type is None and (self._pending or self._syncs):
                (self._pending or self._syncs).popleft().result()
        finally:
            for descriptor in self.open_descriptors:  # left open only by a failure
                os.close(descriptor)
            self.open_descriptors.clear()

    def submit(self, function: Callable[..., None], *arguments: object, holds_tensor: bool = False) -> None:
        while self._pending and self._pending[0].done():
            self._pending.popleft().result()
        future = self._writer.submit(function, *arguments)
        self._pending.append(future)
        if holds_tensor:
            self._queued_tensors.append(future)
            while len(self._queued_tensors) > _MAX_QUEUED_TENSORS:
                self._queued_tensors.popleft().result()

    def sync_and_close(self, descriptor: int) -> None:
        """Called from the writer thread once a file is complete."""

        def durable() -> None:
            os.fsync(descriptor)
            os.close(descriptor)
            self.open_descriptors.discard(descriptor)

        self._syncs.append(self._syncer.submit(durable))


class QueuedFile:
    """A file written through a BackgroundWriter, in the order of the calls; `close` checks its size."""

    def __init__(self, writer: BackgroundWriter, path: Path, expected_bytes: int) -> None:
        self._writer, self._path, self._expected_bytes = writer, path, expected_bytes
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        writer.open_descriptors.add(descriptor)
        self._sink = ShardSink(descriptor, writer.on_bytes)

    def write_bytes(self, data: bytes) -> None:
        self._writer.submit(self._sink.write_bytes, data)

    def copy_range(self, source: Path, begin: int, length: int) -> None:
        self._writer.submit(self._sink.copy_range, source, begin, length)

    def write_tensor(self, tensor: torch.Tensor) -> None:
        self._writer.submit(self._sink.write_tensor, tensor, holds_tensor=True)

    def close(self) -> None:
        self._writer.submit(self._finish)

    def _finish(self) -> None:
        if self._sink.bytes_written != self._expected_bytes:
            raise RuntimeError(
                f"{self._path}: wrote {self._sink.bytes_written} bytes, the header announces {self._expected_bytes}"
            )
        self._writer.sync_and_close(self._sink.descriptor)


def queue_shard(
    writer: BackgroundWriter, path: Path, entries: Sequence[HeaderEntry], metadata: dict[str, str] | None
) -> QueuedFile:
    """Start a shard: its header is queued; the caller then queues each tensor in header order and closes it."""
    header = encode_header(entries, metadata)
    shard = QueuedFile(writer, path, len(header) + sum(entry.nbytes for entry in entries))
    shard.write_bytes(header)
    return shard


def queue_file_copy(writer: BackgroundWriter, source: Path, destination: Path) -> None:
    """Copy a whole file (following symlinks, as in the hub cache) without reading it into memory."""
    size = Path(source).stat().st_size
    copy = QueuedFile(writer, destination, size)
    copy.copy_range(Path(source), 0, size)
    copy.close()
