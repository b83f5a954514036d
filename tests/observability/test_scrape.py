"""A real worker with its metrics endpoint on (settings.metrics_port), driven through Load, Forward,
ForwardPaged, failing calls and Unload; `/metrics` is scraped over HTTP and parsed with prometheus_client's
text parser. Expected values come from what the test sent and from the replies (token counts, ModelInfo,
the client's own call timings), never from the metrics code."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.worker.harness import RunningServer, load_request, make_settings, rpc_error, start_server
from worker.pb.modelworker.v1 import worker_pb2 as pb

from .scrape import GO_CODE_NAMES, Scrape, naming_problems, promtool_problems, scrape

SERVICE = "modelworker.v1.ModelWorker"
ARCH = "LlamaForCausalLM"
VOCAB = 128
# DESIGN.md "Metrics": binding names (as families; counters without their _total sample suffix).
DESIGN_FAMILIES = {
    "modelworker_model_load_seconds": "histogram",
    "modelworker_model_unload_seconds": "histogram",
    "modelworker_models_loaded": "gauge",
    "modelworker_model_weight_bytes": "gauge",
    "modelworker_kv_cache_bytes": "gauge",
    "modelworker_forward_seconds": "histogram",
    "modelworker_forward_tokens": "counter",
    "modelworker_lock_wait_seconds": "histogram",
    "modelworker_device_memory_bytes": "gauge",
    "grpc_server_started": "counter",
    "grpc_server_handled": "counter",
    "grpc_server_handling_seconds": "histogram",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Flow:
    """What the test did, and the two scrapes (before and after Unload)."""

    info: pb.ModelInfo
    unload: pb.UnloadResponse
    forward_tokens: int = 0
    paged_tokens: int = 0
    dense_prefills: int = 0
    decodes: int = 0
    forward_wall: float = 0.0  # client-measured seconds of the successful Forward calls
    started: dict[str, int] = field(default_factory=dict)  # method -> calls made
    codes: dict[tuple[str, str], int] = field(default_factory=dict)  # (method, code) -> calls
    before: Scrape | None = None
    after: Scrape | None = None


@pytest.fixture(scope="module")
def worker(aio_loop: asyncio.AbstractEventLoop, model_root: Path) -> Iterator[RunningServer]:
    settings = make_settings(model_root, metrics_port=free_port())
    running = start_server(aio_loop, settings)
    yield running
    running.stop(grace=0.5)


@pytest.fixture(scope="module")
def flow(worker: RunningServer) -> Flow:
    seed = random.randrange(2**31)
    print(f"seed {seed}")
    rng = np.random.default_rng(seed)
    stub = worker.stub()
    port = worker.server.metrics_http.port
    calls: dict[str, int] = {}
    codes: dict[tuple[str, str], int] = {}

    def call(method: str, request: Any, expect: grpc.StatusCode = grpc.StatusCode.OK) -> Any:
        calls[method] = calls.get(method, 0) + 1
        code = GO_CODE_NAMES[expect.value[0]]
        codes[(method, code)] = codes.get((method, code), 0) + 1
        fn: Callable[[Any], Any] = getattr(stub, method)
        if expect is grpc.StatusCode.OK:
            return fn(request)
        assert rpc_error(lambda: fn(request)).code() is expect
        return None

    info = call("Load", load_request("m", "llama")).model
    assert call("Load", load_request("m", "llama")).already_loaded
    call("Load", load_request("x", "no-such-dir"), grpc.StatusCode.NOT_FOUND)
    call("Load", load_request("bad id!", "llama"), grpc.StatusCode.INVALID_ARGUMENT)
    flow = Flow(info=info, unload=pb.UnloadResponse())

    def forward(request: pb.ForwardRequest) -> None:
        started = time.perf_counter()
        call("Forward", request)
        flow.forward_wall += time.perf_counter() - started
        flow.forward_tokens += len(request.token_ids)

    for _ in range(int(rng.integers(2, 5))):  # stateless forwards of random shapes
        batch, seq = int(rng.integers(1, 4)), int(rng.integers(2, 12))
        forward(
            pb.ForwardRequest(
                model_id="m", token_ids=rng.integers(0, VOCAB, batch * seq).tolist(), batch_size=batch
            )
        )
        flow.dense_prefills += 1
    prompt = int(rng.integers(3, 20))  # a cached prefill, then decode steps
    forward(
        pb.ForwardRequest(model_id="m", token_ids=rng.integers(0, VOCAB, prompt).tolist(), use_cache=True)
    )
    flow.dense_prefills += 1
    for step in range(int(rng.integers(1, 4))):
        forward(
            pb.ForwardRequest(
                model_id="m", token_ids=[int(rng.integers(0, VOCAB))], use_cache=True, start_pos=prompt + step
            )
        )
        flow.decodes += 1
    length = int(rng.integers(2, 30))  # one paged prefill into blocks 0..
    call(
        "ForwardPaged",
        pb.ForwardPagedRequest(
            model_id="m",
            input_tokens=rng.integers(0, VOCAB, length).tolist(),
            positions=list(range(length)),
            block_tables=[pb.BlockTable(block_ids=[0, 1])],
            slot_mapping=list(range(length)),
            context_lens=[length],
            is_prefill=True,
        ),
    )
    flow.paged_tokens = length

    call("Forward", pb.ForwardRequest(model_id="nope", token_ids=[1]), grpc.StatusCode.NOT_FOUND)
    call("Forward", pb.ForwardRequest(model_id="m", token_ids=[1, VOCAB]), grpc.StatusCode.INVALID_ARGUMENT)
    call(
        "Forward",
        pb.ForwardRequest(model_id="m", token_ids=[1, 2, 3], batch_size=2),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    call("ListModels", pb.ListModelsRequest())
    health = health_pb2_grpc.HealthStub(worker.channel())
    assert health.Check(health_pb2.HealthCheckRequest(service=SERVICE)).status == 1  # SERVING
    flow.before = scrape(port)

    flow.unload = call("Unload", pb.UnloadRequest(model_id="m"))
    call("Unload", pb.UnloadRequest(model_id="m"), grpc.StatusCode.NOT_FOUND)
    flow.after = scrape(port)
    flow.started, flow.codes = calls, codes
    return flow


def test_design_metric_names_are_exposed(flow: Flow) -> None:
    assert flow.before is not None
    for name, kind in DESIGN_FAMILIES.items():
        assert flow.before.types.get(name) == kind, f"{name}: {flow.before.types.get(name)}"


def test_grpc_server_metrics_count_every_code(flow: Flow) -> None:
    s = flow.after
    assert s is not None
    for method, n in flow.started.items():
        labels = dict(grpc_type="unary", grpc_service=SERVICE, grpc_method=method)
        assert s.value("grpc_server_started_total", **labels) == n, method
        assert s.value("grpc_server_handling_seconds_count", **labels) == n, method
        assert s.total("grpc_server_handled_total", **labels) == n, method
    for (method, code), n in flow.codes.items():
        assert s.value("grpc_server_handled_total", grpc_method=method, grpc_code=code) == n, (method, code)
    # The counts the issue names, spelled out.
    assert s.value("grpc_server_handled_total", grpc_method="Forward", grpc_code="NotFound") == 1
    assert s.value("grpc_server_handled_total", grpc_method="Forward", grpc_code="InvalidArgument") == 2
    assert s.value("grpc_server_handled_total", grpc_method="Load", grpc_code="OK") == 2
    # No code the server never answered.
    seen = {
        (x.labels["grpc_method"], x.labels["grpc_code"])
        for x in s.samples
        if x.name == "grpc_server_handled_total"
    }
    assert {k for k in seen if k[0] in flow.started} == set(flow.codes)
    health = dict(grpc_service="grpc.health.v1.Health", grpc_method="Check", grpc_type="unary")
    assert s.value("grpc_server_handled_total", grpc_code="OK", **health) == 1
    # Handling time: the Forward calls' sum is positive and below what the client measured in total.
    assert 0 < s.value("grpc_server_handling_seconds_sum", grpc_method="Forward") < 60


def test_load_and_memory_metrics(flow: Flow, model_root: Path) -> None:
    s = flow.before
    assert s is not None
    assert (
        s.value("modelworker_model_load_seconds_count", architecture=ARCH) == 1
    )  # already_loaded not counted
    assert s.value("modelworker_model_load_seconds_sum", architecture=ARCH) == pytest.approx(
        flow.info.load_seconds
    )
    assert s.value("modelworker_model_load_seconds_bucket", architecture=ARCH, le="600.0") == 1
    assert s.value("modelworker_model_load_failures_total", code="NotFound") == 1
    assert s.value("modelworker_models_loaded") == 1
    weights = s.value("modelworker_model_weight_bytes", model="m")
    assert weights == flow.info.weight_bytes
    # Independently: float32 on CPU, so 4 bytes for each value in the checkpoint.
    from safetensors import safe_open

    with safe_open(model_root / "llama" / "model.safetensors", "pt") as f:
        numel = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    assert weights == 4 * numel
    assert s.value("modelworker_kv_cache_bytes", model="m") == flow.info.kv_cache_bytes > 0


def test_forward_metrics(flow: Flow) -> None:
    s = flow.before
    assert s is not None
    assert s.value("modelworker_forward_tokens_total", model="m", rpc="Forward") == flow.forward_tokens
    assert s.value("modelworker_forward_tokens_total", model="m", rpc="ForwardPaged") == flow.paged_tokens
    count = "modelworker_forward_seconds_count"
    assert s.value(count, model="m", rpc="Forward", phase="prefill") == flow.dense_prefills
    assert s.value(count, model="m", rpc="Forward", phase="decode") == flow.decodes
    assert s.value(count, model="m", rpc="ForwardPaged", phase="prefill") == 1
    assert s.value(count, model="m", rpc="Forward", phase="mixed") is None
    # Each forward's server time lies inside the client's call.
    assert 0 < s.total("modelworker_forward_seconds_sum", model="m", rpc="Forward") <= flow.forward_wall
    # The smallest bucket is sub-millisecond; buckets are cumulative and end at the count.
    buckets = sorted(
        (float(x.labels["le"]), x.value)
        for x in s.samples
        if x.name == "modelworker_forward_seconds_bucket"
        and x.labels["phase"] == "prefill"
        and x.labels["rpc"] == "Forward"
    )
    assert buckets[0][0] < 0.001 and buckets[-1] == (float("inf"), flow.dense_prefills)
    assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:], strict=False))
    # Every call that ran on the model took its lock; the failing ones may have been refused first.
    ok_locked = flow.dense_prefills + flow.decodes + 1
    waits = s.value("modelworker_lock_wait_seconds_count", model="m")
    assert waits is not None and ok_locked <= waits <= ok_locked + 2


def test_device_memory_is_read_at_scrape_time(flow: Flow) -> None:
    s = flow.before
    assert s is not None
    total = s.value("modelworker_device_memory_bytes", device="cpu", kind="total")
    available = s.value("modelworker_device_memory_bytes", device="cpu", kind="available")
    rss = s.value("modelworker_device_memory_bytes", device="cpu", kind="process_resident")
    assert total == psutil.virtual_memory().total
    assert available is not None and 0 < available <= total
    reference = psutil.Process().memory_info().rss
    assert rss is not None and abs(rss - reference) < 0.25 * reference


def test_unload_removes_the_model_series(flow: Flow) -> None:
    before, after = flow.before, flow.after
    assert before is not None and after is not None
    assert before.with_label("model", "m")
    assert after.with_label("model", "m") == []
    assert after.value("modelworker_models_loaded") == 0
    assert after.value("modelworker_model_unload_seconds_count", architecture=ARCH) == 1
    assert after.value("modelworker_model_unload_seconds_sum", architecture=ARCH) == pytest.approx(
        flow.unload.unload_seconds
    )
    # Load history and the gRPC counters are not per model: they stay.
    assert after.value("modelworker_model_load_seconds_count", architecture=ARCH) == 1


def test_scrape_passes_the_metrics_linter(flow: Flow) -> None:
    for s in (flow.before, flow.after):
        assert s is not None
        assert naming_problems(s) == []
        problems = promtool_problems(s.text)
        if problems is not None:  # promtool (Debian package prometheus) is installed
            assert problems == []


def test_metrics_endpoint_stops_with_the_server(
    aio_loop: asyncio.AbstractEventLoop, model_root: Path
) -> None:
    port = free_port()
    running = start_server(aio_loop, make_settings(model_root, metrics_port=port))
    assert scrape(port).value("modelworker_models_loaded") == 0
    running.stop(grace=0.1)
    with pytest.raises(OSError):
        scrape(port)


def test_denied_calls_are_counted_and_registries_are_per_server(
    aio_loop: asyncio.AbstractEventLoop, model_root: Path, worker: RunningServer, flow: Flow
) -> None:
    """Auth rejects before the servicer runs: the outermost metrics interceptor still counts it. This
    second server's registry is its own (the first server's counters did not move). Denied and
    accepted calls alternate twice: the interceptors' per-method handler caches never serve one for
    the other."""
    port = free_port()
    running = start_server(aio_loop, make_settings(model_root, metrics_port=port, auth_token="s3cret"))
    try:
        for _ in range(2):
            err = rpc_error(lambda: running.stub().ListModels(pb.ListModelsRequest()))
            assert err.code() is grpc.StatusCode.UNAUTHENTICATED
            ok = running.stub().ListModels(
                pb.ListModelsRequest(), metadata=[("authorization", "Bearer s3cret")]
            )
            assert list(ok.models) == []
        s = scrape(port)
        assert (
            s.value("grpc_server_handled_total", grpc_method="ListModels", grpc_code="Unauthenticated") == 2
        )
        assert s.value("grpc_server_handled_total", grpc_method="ListModels", grpc_code="OK") == 2
        # A refused call is served by a request-streaming handler that never reads the request.
        for grpc_type in ("unary", "client_stream"):
            assert s.value("grpc_server_started_total", grpc_method="ListModels", grpc_type=grpc_type) == 2
        assert s.value("grpc_server_started_total", grpc_method="Forward") is None
        first = scrape(worker.server.metrics_http.port)
        assert first.value("grpc_server_handled_total", grpc_method="ListModels", grpc_code="OK") == 1
        assert (
            first.value("grpc_server_handled_total", grpc_method="ListModels", grpc_code="Unauthenticated")
            is None
        )
    finally:
        running.stop(grace=0.1)


def test_a_busy_metrics_port_stops_the_start(aio_loop: asyncio.AbstractEventLoop, model_root: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(OSError, match=rf"cannot serve metrics on 127\.0\.0\.1:{port}: "):
            start_server(aio_loop, make_settings(model_root, metrics_port=port))


def test_metrics_port_zero_means_off(aio_loop: asyncio.AbstractEventLoop, model_root: Path) -> None:
    running = start_server(aio_loop, make_settings(model_root, metrics_port=0))
    try:
        assert running.server.metrics_http is None
        running.stub().ListModels(pb.ListModelsRequest())
        # The registry still counts (an embedding application can serve it itself).
        assert (
            running.server.metrics.registry.get_sample_value(
                "grpc_server_handled_total",
                dict(grpc_type="unary", grpc_service=SERVICE, grpc_method="ListModels", grpc_code="OK"),
            )
            == 1
        )
    finally:
        running.stop(grace=0.1)
