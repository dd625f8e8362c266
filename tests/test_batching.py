"""The shared batch loop: longest first, halved and retried on out-of-memory, progress hooks in order."""

from __future__ import annotations

import pytest
import torch

from lib.core.batching import BatchSizer, is_out_of_memory, length_sorted_order, run_in_batches
from lib.core.errors import UserError

CPU = torch.device("cpu")
PROMPTS = [[7] * length for length in (1, 2, 3, 4, 5)]  # longest first: 4, 3, 2, 1, 0


def _automatic_sizer(size: int) -> BatchSizer:
    sizer = BatchSizer(size, None, 0, 0)  # a fixed size needs no model; then made automatic
    sizer.automatic = True
    return sizer


def test_longest_prompts_come_first() -> None:
    assert length_sorted_order([[1], [1, 2, 3], [1, 2]]) == [1, 2, 0]


def test_out_of_memory_is_recognised_by_type_and_message() -> None:
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 2 GB"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_an_abandoned_batch_is_retried_halved_and_every_prompt_runs_once() -> None:
    events: list[tuple] = []

    def run(indices: list[int]) -> int:
        events.append(("run", indices))
        if len(indices) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return sum(indices)

    batches = list(
        run_in_batches(
            PROMPTS,
            _automatic_sizer(4),
            run,
            CPU,
            starting=lambda done, indices: events.append(("starting", done, indices)),
            abandoned=lambda indices: events.append(("abandoned", indices)),
            resized=lambda size: events.append(("resized", size)),
        )
    )
    assert batches == [([4, 3], 7), ([2, 1], 3), ([0], 0)]
    assert events[:5] == [
        ("starting", 0, [4, 3, 2, 1]),
        ("run", [4, 3, 2, 1]),
        ("abandoned", [4, 3, 2, 1]),
        ("resized", 2),
        ("starting", 0, [4, 3]),
    ]
    assert events[-2:] == [("starting", 4, [0]), ("run", [0])]


def test_a_fixed_size_out_of_memory_stops_with_advice_and_other_errors_pass() -> None:
    def out_of_memory(indices: list[int]) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(UserError, match="--batch-size 2: out of memory; use a smaller --batch-size"):
        list(run_in_batches(PROMPTS, BatchSizer(2, None, 0, 0), out_of_memory, CPU))
    with pytest.raises(UserError, match="out of memory with one prompt per batch"):
        list(run_in_batches(PROMPTS, _automatic_sizer(1), out_of_memory, CPU))

    def broken(indices: list[int]) -> None:
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        list(run_in_batches(PROMPTS, _automatic_sizer(2), broken, CPU))
