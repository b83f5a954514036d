"""The metrics follow updates and memory release: `modelworker_weight_update_seconds{model,source}`
counts each applied update by source, the resident bytes gauges drop to zero for released memory and
come back on resume, and every series of the model goes away with Unload."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.observability.scrape import naming_problems, scrape
from tests.worker.harness import RunningServer, make_settings, start_server
from worker.client import ModelWorkerClient

from .conftest import SMALL_KV
from .helpers import checkpoint
from .trainer import free_port

UPDATE = "modelworker_weight_update_seconds_count"


@pytest.fixture(scope="module")
def metered(aio_loop: asyncio.AbstractEventLoop, update_root: Path) -> Iterator[tuple[RunningServer, int]]:
    port = free_port()
    running = start_server(aio_loop, make_settings(update_root, metrics_port=port, grace_seconds=0.5))
    yield running, port
    running.stop(grace=0.5)


def test_update_and_release_metrics(metered, update_root) -> None:
    running, port = metered
    with ModelWorkerClient(running.target, timeout=60) as client:
        model = client.load("m", "llama-a", kv_cache=SMALL_KV).model
        client.update_weights("m", "llama-b")
        client.update_weights("m", "llama-a")
        client.update_weights_from_stream("m", checkpoint(update_root, "llama-b"))
        s = scrape(port)
        assert s.value(UPDATE, model="m", source="disk") == 2
        assert s.value(UPDATE, model="m", source="stream") == 1
        assert not naming_problems(s)

        client.release_memory("m", ["kv_cache"])
        s = scrape(port)
        assert s.value("modelworker_model_weight_bytes", model="m") == model.weight_bytes
        assert s.value("modelworker_kv_cache_bytes", model="m") == 0
        client.release_memory("m", ["weights"])
        assert scrape(port).value("modelworker_model_weight_bytes", model="m") == 0
        client.resume_memory("m")
        s = scrape(port)
        assert s.value("modelworker_model_weight_bytes", model="m") == model.weight_bytes
        assert s.value("modelworker_kv_cache_bytes", model="m") == model.kv_cache_bytes

        client.unload("m")
        assert scrape(port).with_label("model", "m") == []
