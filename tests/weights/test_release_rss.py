"""ReleaseMemory gives the memory back to the operating system: a `modelworker serve` process's
resident memory (psutil) drops by at least 90% of the model's weights plus KV cache, and resume
brings back the same logits bit for bit."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.reliability.procs import ServeProcess
from tests.tiny_models import make_tiny_model_dir
from worker.client import FailedPreconditionError, KvCacheConfig, ModelWorkerClient

from .helpers import TOKENS

# ~84 MB of float32 weights and a 64 MiB paged cache: far above allocator noise, quick to load.
WIDE = dict(
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
)
KV = KvCacheConfig(block_size=16, num_blocks=512, max_seq_len=64, max_batch_size=1)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, weights_seed: int) -> Iterator[ServeProcess]:
    root = tmp_path_factory.mktemp("release-root")
    make_tiny_model_dir(root / "wide", "llama", seed=weights_seed, **WIDE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELWORKER_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    with ServeProcess(root, env, "--load-mode", "copy") as running:
        yield running


@pytest.mark.parametrize("cycle", [0, 1])
def test_release_returns_memory_and_resume_restores_logits(served: ServeProcess, cycle: int) -> None:
    with ModelWorkerClient(f"127.0.0.1:{served.port}", timeout=120) as client:
        if cycle == 0:
            client.load("wide", "wide", kv_cache=KV)
        model = next(m for m in client.list_models() if m.id == "wide")
        held = model.weight_bytes + model.kv_cache_bytes
        before = client.forward("wide", TOKENS, logits_mode="all").logits
        loaded_rss = served.settled_rss()
        released = client.release_memory("wide")
        assert released.released_bytes == held
        released_rss = served.settled_rss()
        # Weights are read in (--load-mode copy: mapped pages would be the page cache's); the KV
        # cache is a lazily zeroed map, resident only where tokens were written, so the rule is on
        # the weights plus nothing more than what the cache really held.
        assert loaded_rss - released_rss >= 0.9 * model.weight_bytes, (loaded_rss, released_rss, held)
        with pytest.raises(FailedPreconditionError):
            client.forward("wide", TOKENS)
        client.resume_memory("wide")
        assert np.array_equal(client.forward("wide", TOKENS, logits_mode="all").logits, before)
    # Operators see every change of what the worker holds in its log, with the bytes.
    line = served.wait_for(lambda r: r.get("method") == "ReleaseMemory" and r.get("code") == "OK")
    assert line["released_bytes"] == held and line["tags"] == ["weights", "kv_cache"]
    assert served.wait_for(lambda r: r.get("method") == "ResumeMemory")["resumed_bytes"] == held
