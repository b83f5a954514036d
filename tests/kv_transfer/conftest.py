"""Two `python -m worker serve` processes (A and B) on loopback, each with the same tiny Llama loaded
in float32 and bfloat16, and on B models whose cache layout differs (block size, head count)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.observability.test_scrape import free_port
from tests.serve_process import ServeLog
from tests.tiny_models import make_tiny_model_dir
from worker.client import KvCacheConfig, ModelWorkerClient

BLOCK = 4
NUM_BLOCKS = 24
# A's cap makes its exports split into many chunks; B keeps the default.
A_MAX_MESSAGE_BYTES = 65536


@dataclass
class Worker:
    serve: ServeLog
    client: ModelWorkerClient
    target: str
    metrics_port: int


def write_models(root: Path, seed: int) -> None:
    make_tiny_model_dir(root / "llama", "llama", seed=seed)
    make_tiny_model_dir(root / "llama-4kv", "llama", seed=seed, num_key_value_heads=4)


def _start(root: Path, *extra: str) -> tuple[ServeLog, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELWORKER_")}
    env["OMP_NUM_THREADS"] = "1"
    port = free_port()
    serve = ServeLog(
        [
            "--port", "0", "--metrics-port", str(port), "--model-root", str(root), "--device", "cpu",
            "--grace-seconds", "1", *extra,
        ],
        env=env,
    )  # fmt: skip
    return serve, port


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory, weights_seed: int) -> Iterator[tuple[Worker, Worker]]:
    root = tmp_path_factory.mktemp("kv-models")
    # Both processes start first: their start-ups overlap each other and the writing of the models.
    started = [_start(root, "--max-message-bytes", str(A_MAX_MESSAGE_BYTES)), _start(root)]
    out = []
    try:
        write_models(root, weights_seed)
        for serve, metrics_port in started:
            target = f"127.0.0.1:{serve.listening_port()}"
            client = ModelWorkerClient(target, timeout=60)
            kv = KvCacheConfig(block_size=BLOCK, num_blocks=NUM_BLOCKS, max_seq_len=64)
            client.load("f32", "llama", dtype="float32", kv_cache=kv)
            client.load("b16", "llama", dtype="bfloat16", kv_cache=kv)
            out.append(Worker(serve, client, target, metrics_port))
        b = out[1].client
        b.load(
            "bs8",
            "llama",
            dtype="float32",
            kv_cache=KvCacheConfig(block_size=8, num_blocks=12, max_seq_len=64),
        )
        b.load(
            "kv4",
            "llama-4kv",
            dtype="float32",
            kv_cache=KvCacheConfig(block_size=BLOCK, num_blocks=8, max_seq_len=64),
        )
        yield out[0], out[1]
    finally:
        for w in out:
            w.client.close()
        for serve, _ in started:
            serve.proc.terminate()  # both at once; stop() then only waits
        for serve, _ in started:
            serve.stop()
