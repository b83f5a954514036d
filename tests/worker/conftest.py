"""Fixtures: the session's event loop and tiny model directories, a shared server per module."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.tiny_models import make_tiny_model_dir

from . import slow_arch
from .harness import RunningServer, make_settings, start_server


@pytest.fixture(scope="session")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One root with two tiny Llamas (different weights), a tiny Qwen2 and slow Llama copies."""
    root = tmp_path_factory.mktemp("models")
    make_tiny_model_dir(root / "llama-a", "llama", seed=1)
    make_tiny_model_dir(root / "llama-b", "llama", seed=2)
    make_tiny_model_dir(root / "qwen", "qwen2", seed=3)
    slow_arch.make_slow_copy(root / "llama-a", root / "slow-load", load_seconds=1.5)
    slow_arch.make_slow_copy(root / "llama-a", root / "slow-forward", forward_seconds=0.5)
    return root


@pytest.fixture(scope="module")
def worker(aio_loop: asyncio.AbstractEventLoop, model_root: Path) -> Iterator[RunningServer]:
    """One plain server per test module (no auth, default caps)."""
    running = start_server(aio_loop, make_settings(model_root))
    yield running
    running.stop(grace=0.5)
