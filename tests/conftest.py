"""Shared pytest fixtures: tiny real-architecture checkpoints, built once per test session."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch

from tests.fixtures import build_fixture

FixtureFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> FixtureFactory:
    """Return `make(model_type, single_file=False, **options) -> Path`, caching each build.

    Tests must treat the returned directory as read-only: it is shared by the whole session.
    """
    built: dict[tuple, Path] = {}

    def make(model_type: str, single_file: bool = False, **options) -> Path:
        key = (model_type, single_file, tuple(sorted(options.items())))
        if key not in built:
            layout = "single" if single_file else "sharded"
            directory = tmp_path_factory.mktemp(f"{model_type}-{layout}")
            built[key] = build_fixture(model_type, directory, single_file=single_file, **options)
        return built[key]

    return make


@pytest.fixture(scope="session", autouse=True)
def single_torch_thread():
    """Run torch on one thread: tiny fixture models gain nothing from intra-op parallelism, and while
    other work keeps a core busy, every OpenMP barrier waits for a descheduled thread (a forward
    pass of a small MoE fixture took 10-30x longer with two threads on this two-core machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def demo_directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo chat model, built once per session through its command line (about a minute)."""
    from demo.build_model import main

    output = tmp_path_factory.mktemp("demo") / "demo-model"
    assert main(["--output", str(output)]) == 0
    return output
