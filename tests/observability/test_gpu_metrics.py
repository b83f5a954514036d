"""Device memory metrics on CUDA (marker `gpu`, skipped without CUDA; `make gpu-check` runs it): a
model loaded on the GPU shows up in the allocator's bytes, and leaves them on Unload."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from tests.worker.harness import load_request, make_settings, start_server
from worker.pb.modelworker.v1 import worker_pb2 as pb

from .scrape import scrape
from .test_scrape import free_port

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_cuda_memory_follows_load_and_unload(aio_loop: asyncio.AbstractEventLoop, model_root: Path) -> None:
    port = free_port()
    running = start_server(aio_loop, make_settings(model_root, metrics_port=port, device="cuda:0"))
    try:
        info = running.stub().Load(load_request("g", "llama", device="cuda:0")).model
        loaded = scrape(port)
        running.stub().Unload(pb.UnloadRequest(model_id="g"))
        unloaded = scrape(port)
    finally:
        running.stop(grace=0.5)

    def kind(s, name: str) -> float:
        value = s.value("modelworker_device_memory_bytes", device="cuda:0", kind=name)
        assert value is not None, name
        return value

    free, total = torch.cuda.mem_get_info(0)
    assert kind(loaded, "total") == total
    assert 0 <= kind(loaded, "free") <= total
    assert kind(loaded, "reserved") >= kind(loaded, "allocated") >= info.weight_bytes + info.kv_cache_bytes
    freed = kind(loaded, "allocated") - kind(unloaded, "allocated")
    assert freed >= info.weight_bytes + info.kv_cache_bytes, (freed, info.weight_bytes, info.kv_cache_bytes)
    assert loaded.value("modelworker_model_weight_bytes", model="g") == info.weight_bytes
    assert unloaded.with_label("model", "g") == []
