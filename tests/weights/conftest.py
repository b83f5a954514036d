"""Fixtures: a real worker on loopback holding tiny Llamas with fresh random weights (checkpoints
A and B of one architecture, and a Qwen2 whose q/k/v biases make it a different shape set)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.tiny_models import make_tiny_model_dir
from tests.worker.harness import RunningServer, make_settings, start_server
from worker.client import KvCacheConfig, ModelWorkerClient

from .helpers import TOKENS, logits

SMALL_KV = KvCacheConfig(block_size=16, num_blocks=16, max_seq_len=64, max_batch_size=2)


@pytest.fixture(scope="session")
def update_root(tmp_path_factory: pytest.TempPathFactory, weights_seed: int) -> Path:
    root = tmp_path_factory.mktemp("update-models")
    make_tiny_model_dir(root / "llama-a", "llama", seed=weights_seed)
    make_tiny_model_dir(root / "llama-b", "llama", seed=weights_seed + 1)
    make_tiny_model_dir(root / "qwen", "qwen2", seed=weights_seed + 2)
    # Tied embeddings: lm_head is embed_tokens, one Parameter that updates and release keep shared.
    make_tiny_model_dir(root / "tied-a", "llama", seed=weights_seed + 3, tie_word_embeddings=True)
    make_tiny_model_dir(root / "tied-b", "llama", seed=weights_seed + 4, tie_word_embeddings=True)
    return root


@pytest.fixture(scope="module")
def worker(aio_loop: asyncio.AbstractEventLoop, update_root: Path) -> Iterator[RunningServer]:
    running = start_server(aio_loop, make_settings(update_root, grace_seconds=0.5))
    yield running
    running.stop(grace=0.5)


@pytest.fixture
def client(worker: RunningServer) -> Iterator[ModelWorkerClient]:
    with ModelWorkerClient(worker.target, timeout=60) as c:
        yield c


@pytest.fixture
def loaded(client: ModelWorkerClient, request: pytest.FixtureRequest) -> Iterator[str]:
    """llama-a loaded under a per-test id; unloaded afterwards."""
    model_id = f"upd-{request.node.name}"[:100].replace("[", "-").replace("]", "")
    client.load(model_id, "llama-a", kv_cache=SMALL_KV)
    yield model_id
    client.unload(model_id)


@pytest.fixture(scope="module")
def reference(worker, update_root: Path) -> dict[str, np.ndarray]:
    """Logits of fresh Loads of A and of B (the independent reference for every update)."""
    with ModelWorkerClient(worker.target, timeout=60) as c:
        out = {}
        for name in ("llama-a", "llama-b"):
            c.load(f"ref-{name}", name, kv_cache=SMALL_KV)
            out[name] = logits(c, f"ref-{name}")
            c.unload(f"ref-{name}")
    assert not np.array_equal(out["llama-a"], out["llama-b"])
    out["tokens"] = TOKENS
    return out
