"""Fixtures: a real worker on loopback (the worker tests' harness), tiny model directories with
fresh random weights, and a client of that worker."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.tiny_models import make_tiny_model_dir
from tests.worker import slow_arch
from tests.worker.harness import RunningServer, make_settings, start_server
from worker.client import ModelWorkerClient


@pytest.fixture(scope="session")
def client_model_root(tmp_path_factory: pytest.TempPathFactory, weights_seed: int) -> Path:
    """A tiny Llama and a tiny Qwen2 with fresh random weights, and a Llama whose forwards sleep."""
    root = tmp_path_factory.mktemp("client-models")
    make_tiny_model_dir(root / "llama", "llama", seed=weights_seed)
    make_tiny_model_dir(root / "qwen", "qwen2", seed=weights_seed + 1)
    slow_arch.make_slow_copy(root / "llama", root / "slow-forward", forward_seconds=0.5)
    slow_arch.make_slow_copy(root / "llama", root / "slow-load", load_seconds=1.0)
    return root


@pytest.fixture(scope="module")
def worker(aio_loop: asyncio.AbstractEventLoop, client_model_root: Path) -> Iterator[RunningServer]:
    running = start_server(aio_loop, make_settings(client_model_root, grace_seconds=0.5))
    yield running
    running.stop(grace=0.5)


@pytest.fixture
def client(worker: RunningServer) -> Iterator[ModelWorkerClient]:
    with ModelWorkerClient(worker.target, timeout=60) as c:
        yield c
