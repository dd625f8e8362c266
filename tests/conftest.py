"""Shared pytest fixtures: tiny real-architecture checkpoints, built once per test session."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

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


@pytest.fixture
def synced_paths(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The path behind every descriptor passed to os.fsync during the test, in call order.

    The real fsync still runs: the code under test does its real writes, this only watches.
    """
    synced: list[Path] = []
    real_fsync = os.fsync

    def recording_fsync(descriptor: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{descriptor}")))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return synced


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
def shipped_demo_model() -> Path:
    """The demo chat model the repository ships in demo/model/ (read-only: shared by the session)."""
    from demo.toy_model import SHIPPED_MODEL_DIRECTORY

    assert (SHIPPED_MODEL_DIRECTORY / "config.json").is_file(), f"{SHIPPED_MODEL_DIRECTORY} is missing"
    return SHIPPED_MODEL_DIRECTORY


@pytest.fixture(scope="session")
def freshly_built_demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo model built through demo/build_toy_model.py's command line from the real training sets,
    shrunk (2 layers, 40 steps) so that it takes seconds: for what the build writes, not how well
    the model refuses."""
    from demo.build_toy_model import main

    output = tmp_path_factory.mktemp("demo") / "demo-model"
    arguments = [
        "--output",
        str(output),
        "--steps",
        "40",
        "--layers",
        "2",
        "--hidden-size",
        "64",
        "--vocab-size",
        "1024",
        "--max-shard-size",
        "200KB",
    ]
    assert main(arguments) == 0
    return output
