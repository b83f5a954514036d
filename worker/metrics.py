"""Prometheus metrics (DESIGN.md "Metrics"): the worker's model metrics, device memory read at scrape
time, and the standard gRPC server set from an aio interceptor, all in one CollectorRegistry per
server (never the process-global one, so several servers can live in one process), served on their own
HTTP port.

Labels stay bounded: `model` only ever names a model this observer saw become READY (its series are
removed when it is unloaded), gRPC labels only name registered methods, and nothing is labelled by
request, token or client.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from registry.registry import ModelEntry

from . import devices
from .gpu_memory import has_context
from .handler_cache import WrappedHandlers
from .logs import LOGGER_NAME
from .metrics_http import start_metrics_http
from .observer import WorkerObserver

log = logging.getLogger(LOGGER_NAME + ".metrics")

# Buckets in seconds. Loads read weights from disk: a tiny model takes tens of milliseconds, a 70B
# checkpoint several minutes. Forwards range from a sub-millisecond decode of a tiny model to a long
# prefill. gRPC calls span both (ListModels .. Load).
LOAD_BUCKETS = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 180.0, 300.0, 450.0, 600.0,
)  # fmt: skip
UPDATE_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
UNLOAD_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
FORWARD_BUCKETS = (
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
LOCK_WAIT_BUCKETS = (0.00001, 0.0001, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0)
# KV block transfers: a few blocks in a millisecond .. a whole cache over a slow link.
KV_TRANSFER_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
GRPC_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
    300.0, 600.0,
)  # fmt: skip

F = TypeVar("F", bound=Callable[..., None])


def _never_raise(fn: F) -> F:
    """Observer hooks run inside the servicer's calls: a metrics bug must not fail a request."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception:
            log.exception("metrics hook %s failed", fn.__name__)

    return wrapper  # type: ignore[return-value]


class PrometheusObserver(WorkerObserver):
    """The servicer's events as model metrics. Called on the event loop only."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.load_seconds = Histogram(
            "modelworker_model_load_seconds",
            "Time to load a model (read weights, build, allocate the KV cache), by architecture.",
            ["architecture"],
            buckets=LOAD_BUCKETS,
            registry=registry,
        )
        self.load_failures = Counter(
            "modelworker_model_load_failures_total",
            "Failed Loads, by the gRPC status code they returned (spelled as grpc_code).",
            ["code"],
            registry=registry,
        )
        self.unload_seconds = Histogram(
            "modelworker_model_unload_seconds",
            "Time to unload a model (wait for in-flight calls, free weights and KV cache), by architecture.",
            ["architecture"],
            buckets=UNLOAD_BUCKETS,
            registry=registry,
        )
        self.models_loaded = Gauge(
            "modelworker_models_loaded", "Models in the READY state.", registry=registry
        )
        self.weight_bytes = Gauge(
            "modelworker_model_weight_bytes",
            "Bytes of a loaded model's weights.",
            ["model"],
            registry=registry,
        )
        self.kv_cache_bytes = Gauge(
            "modelworker_kv_cache_bytes", "Bytes of a loaded model's KV cache.", ["model"], registry=registry
        )
        self.forward_seconds = Histogram(
            "modelworker_forward_seconds",
            "Latency of forward passes (Forward, ForwardPaged) by model, rpc and phase (prefill | decode | mixed).",
            ["model", "rpc", "phase"],
            buckets=FORWARD_BUCKETS,
            registry=registry,
        )
        self.forward_tokens = Counter(
            "modelworker_forward_tokens",
            "Input tokens processed by forward passes, by model and rpc.",
            ["model", "rpc"],
            registry=registry,
        )
        self.lock_wait_seconds = Histogram(
            "modelworker_lock_wait_seconds",
            "Time a call waited for its model's lock (calls on one model are serialized).",
            ["model"],
            buckets=LOCK_WAIT_BUCKETS,
            registry=registry,
        )
        self.kv_transfer_bytes = Counter(
            "modelworker_kv_transfer_bytes",
            "K and V bytes moved by ExportKvBlocks / ImportKvBlocks, by model and direction (export | import).",
            ["model", "direction"],
            registry=registry,
        )
        self.kv_transfer_seconds = Histogram(
            "modelworker_kv_transfer_seconds",
            "Duration of successful KV block transfers (lock, copy and stream), by model and direction.",
            ["model", "direction"],
            buckets=KV_TRANSFER_BUCKETS,
            registry=registry,
        )
        self._kv_directions: dict[str, set[str]] = {}  # model id -> directions it has series for
        self.weight_update_seconds = Histogram(
            "modelworker_weight_update_seconds",
            "Time of an applied weight update (receive or read, check, copy), by model and source "
            "(disk | stream | distributed:gloo | distributed:nccl).",
            ["model", "source"],
            buckets=UPDATE_BUCKETS,
            registry=registry,
        )
        # model id -> the (rpc, phase) pairs it has series for, so unload can remove exactly those.
        self._loaded: dict[str, set[tuple[str, str]]] = {}
        # model id -> the weight-update sources it has series for.
        self._updated: dict[str, set[str]] = {}

    @_never_raise
    def model_loaded(self, entry: ModelEntry) -> None:
        model = entry.model
        assert model is not None, "model_loaded needs a READY entry"
        self._loaded.setdefault(entry.model_id, set())
        self.models_loaded.set(len(self._loaded))
        self.load_seconds.labels(entry.architecture).observe(entry.load_seconds)
        self.weight_bytes.labels(entry.model_id).set(model.weight_bytes)
        self.kv_cache_bytes.labels(entry.model_id).set(model.cache_spec.total_bytes)

    @_never_raise
    def model_load_failed(self, model_id: str, architecture: str, seconds: float, code: str) -> None:
        # The requested architecture is client text (possibly unknown): not a label.
        self.load_failures.labels(grpc_code_label(grpc.StatusCode[code])).inc()

    @_never_raise
    def model_unloaded(self, model_id: str, architecture: str, seconds: float, freed_bytes: int) -> None:
        self.unload_seconds.labels(architecture).observe(seconds)
        pairs = self._loaded.pop(model_id, None)
        self.models_loaded.set(len(self._loaded))
        if pairs is None:
            return
        for metric in (self.weight_bytes, self.kv_cache_bytes, self.lock_wait_seconds):
            _remove(metric, model_id)
        for rpc, phase in pairs:
            _remove(self.forward_seconds, model_id, rpc, phase)
        for rpc in {rpc for rpc, _ in pairs}:
            _remove(self.forward_tokens, model_id, rpc)
        for direction in self._kv_directions.pop(model_id, ()):
            _remove(self.kv_transfer_bytes, model_id, direction)
            _remove(self.kv_transfer_seconds, model_id, direction)
        for source in self._updated.pop(model_id, ()):
            _remove(self.weight_update_seconds, model_id, source)

    @_never_raise
    def weights_updated(self, model_id: str, source: str, seconds: float) -> None:
        if model_id not in self._loaded:  # unloaded meanwhile: no series for it
            return
        self._updated.setdefault(model_id, set()).add(source)
        self.weight_update_seconds.labels(model_id, source).observe(seconds)

    @_never_raise
    def memory_resident(self, model_id: str, weight_bytes: int, kv_cache_bytes: int) -> None:
        if model_id in self._loaded:
            self.weight_bytes.labels(model_id).set(weight_bytes)
            self.kv_cache_bytes.labels(model_id).set(kv_cache_bytes)

    @_never_raise
    def lock_waited(self, model_id: str, seconds: float) -> None:
        # A call that waited behind an Unload arrives after the model is gone: no series for it.
        if model_id in self._loaded:
            self.lock_wait_seconds.labels(model_id).observe(seconds)

    @_never_raise
    def forward_done(self, model_id: str, rpc: str, phase: str, seconds: float, tokens: int) -> None:
        pairs = self._loaded.get(model_id)
        if pairs is None:
            return
        pairs.add((rpc, phase))
        self.forward_seconds.labels(model_id, rpc, phase).observe(seconds)
        self.forward_tokens.labels(model_id, rpc).inc(tokens)

    @_never_raise
    def kv_transferred(self, model_id: str, direction: str, nbytes: int, seconds: float) -> None:
        if model_id not in self._loaded:
            return
        self._kv_directions.setdefault(model_id, set()).add(direction)
        self.kv_transfer_bytes.labels(model_id, direction).inc(nbytes)
        self.kv_transfer_seconds.labels(model_id, direction).observe(seconds)


def _remove(metric: Gauge | Counter | Histogram, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:  # no series was created (e.g. lock never waited on)
        pass


class DeviceMemoryCollector:
    """`modelworker_device_memory_bytes{device,kind}`, read when scraped.

    cpu: total, available (MemAvailable) and process_resident (this process's RSS); cuda:N: total,
    free (driver view, all processes), allocated and reserved (this process's torch allocator). CUDA
    is only asked once this process has initialized it: a scrape of a CPU worker never creates a CUDA
    context, and devices the worker does not use are read through NVML (worker/gpu_memory.py).
    """

    NAME = "modelworker_device_memory_bytes"
    HELP = "Device memory by device and kind (cpu: total, available, process_resident; cuda: total, free, allocated, reserved)."

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily(self.NAME, self.HELP, labels=["device", "kind"])]

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(self.NAME, self.HELP, labels=["device", "kind"])
        try:
            cpu = devices.cpu_memory()
            if cpu.total_bytes:
                family.add_metric(["cpu", "total"], cpu.total_bytes)
                family.add_metric(["cpu", "available"], cpu.free_bytes)
            rss = process_resident_bytes()
            if rss is not None:
                family.add_metric(["cpu", "process_resident"], rss)
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                for index in range(torch.cuda.device_count()):
                    mem = devices.cuda_memory(index)
                    family.add_metric([mem.name, "total"], mem.total_bytes)
                    family.add_metric([mem.name, "free"], mem.free_bytes)
                    if has_context(index):  # this process's allocator; none where it has no context
                        family.add_metric([mem.name, "allocated"], torch.cuda.memory_allocated(index))
                        family.add_metric([mem.name, "reserved"], torch.cuda.memory_reserved(index))
        except Exception:  # a scrape must still return the other metrics
            log.exception("reading device memory for metrics failed")
        return [family]


def process_resident_bytes() -> int | None:
    """This process's resident set size (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


# -- the gRPC server set (go-grpc-prometheus names and labels) ---------------------------------------

_GRPC_TYPES = {
    (False, False): "unary",
    (False, True): "server_stream",
    (True, False): "client_stream",
    (True, True): "bidi_stream",
}


class GrpcServerMetrics(grpc.aio.ServerInterceptor):
    """grpc_server_started_total, grpc_server_handled_total and grpc_server_handling_seconds, with
    go-grpc-prometheus's labels and values (grpc_type unary | server_stream | ..., grpc_code NotFound).

    Install it first (outermost) so it sees the final status of every call, denied ones included:
    a normal return (OK, or the code the handler set), `context.abort` (AbortError; the code is on the
    context), an unexpected exception (the server answers UNKNOWN), cancellation (CANCELLED, or
    DEADLINE_EXCEEDED when the deadline passed). Unknown methods are not counted: their names are
    client text. Only async handlers are wrapped; every handler of this server is async.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        self.started = Counter(
            "grpc_server_started",
            "RPCs started on the server.",
            labels,
            registry=registry,
        )
        self.handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, regardless of success or failure.",
            [*labels, "grpc_code"],
            registry=registry,
        )
        self.handling_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Response latency of RPCs handled by the server (until the handler finished).",
            labels,
            buckets=GRPC_BUCKETS,
            registry=registry,
        )
        self._wrapped = WrappedHandlers(self._wrap)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None:
            return None
        return self._wrapped.get(details.method, handler)

    def _wrap(self, full_method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        service, _, method = full_method.lstrip("/").rpartition("/")
        grpc_type = _GRPC_TYPES[(bool(handler.request_streaming), bool(handler.response_streaming))]
        call = _CallMetrics(self, (grpc_type, service, method))
        attr = {
            "unary": "unary_unary",
            "server_stream": "unary_stream",
            "client_stream": "stream_unary",
            "bidi_stream": "stream_stream",
        }[grpc_type]
        behavior = getattr(handler, attr)
        if inspect.isasyncgenfunction(behavior):
            wrapped: Callable[..., Any] = call.wrap_generator(behavior)
        elif inspect.iscoroutinefunction(behavior):
            wrapped = call.wrap_coroutine(behavior)
        else:
            return handler
        factory = getattr(grpc, f"{attr}_rpc_method_handler")
        return factory(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class _CallMetrics:
    """Counts the calls of one method (its label values fixed, its series looked up once)."""

    def __init__(self, owner: GrpcServerMetrics, labels: tuple[str, str, str]) -> None:
        self.owner = owner
        self.labels = labels
        self.started = owner.started.labels(*labels)
        self.handling_seconds = owner.handling_seconds.labels(*labels)
        self._handled: dict[grpc.StatusCode, Any] = {}

    def handled(self, code: grpc.StatusCode) -> Any:
        counter = self._handled.get(code)
        if counter is None:
            counter = self._handled[code] = self.owner.handled.labels(*self.labels, grpc_code_label(code))
        return counter

    def wrap_coroutine(self, behavior: Callable[[Any, Any], Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call = _Call(self)
            try:
                response = await behavior(request, call.context(context))
            except BaseException as exc:
                call.finish(_code_of_exception(exc, context))
                raise
            call.finish(context.code() or grpc.StatusCode.OK)
            return response

        return wrapped

    def wrap_generator(self, behavior: Callable[[Any, Any], AsyncIterator[Any]]) -> Callable[..., Any]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            call = _Call(self)
            try:
                async for item in behavior(request, call.context(context)):
                    yield item
            except BaseException as exc:
                call.finish(_code_of_exception(exc, context))
                raise
            call.finish(context.code() or grpc.StatusCode.OK)

        return wrapped


class _Call:
    """One call: counted as started now, as handled exactly once."""

    def __init__(self, method: _CallMetrics) -> None:
        self.method = method
        self.finished = False
        method.started.inc()
        self.started = time.perf_counter()

    def finish(self, code: grpc.StatusCode) -> None:
        if self.finished:
            return
        self.finished = True
        self.method.handling_seconds.observe(time.perf_counter() - self.started)
        self.method.handled(code).inc()

    def context(self, context: grpc.aio.ServicerContext) -> grpc.aio.ServicerContext:
        return _CountingContext(context, self)  # type: ignore[return-value]


class _CountingContext:
    """The call's context, with abort() counting the call first: grpc.aio sends the status from inside
    abort(), before the AbortError reaches the interceptor, so a client could otherwise see its error
    (and scrape) before the call is counted. Everything else is the real context."""

    def __init__(self, context: grpc.aio.ServicerContext, call: _Call) -> None:
        self._context = context
        self._call = call

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> NoReturn:
        self._call.finish(code)
        await self._context.abort(code, details, trailing_metadata)
        raise AssertionError("unreachable: abort() raises")  # pragma: no cover

    async def abort_with_status(self, status: grpc.Status) -> NoReturn:
        self._call.finish(status.code)
        await self._context.abort_with_status(status)
        raise AssertionError("unreachable: abort_with_status() raises")  # pragma: no cover


def grpc_code_label(code: grpc.StatusCode) -> str:
    """A status code as go-grpc-prometheus writes it (Go's codes.Code.String()), so that the usual
    gRPC dashboards and alerts work unchanged: OK, Canceled, NotFound, InvalidArgument, ..."""
    if code is grpc.StatusCode.CANCELLED:
        return "Canceled"
    if code is grpc.StatusCode.OK:
        return "OK"
    return "".join(part.capitalize() for part in code.name.split("_"))


def _code_of_exception(exc: BaseException, context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    if isinstance(exc, grpc.aio.AbortError):
        return context.code() or grpc.StatusCode.UNKNOWN
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        remaining = context.time_remaining()
        return (
            grpc.StatusCode.DEADLINE_EXCEEDED
            if remaining is not None and remaining <= 0
            else grpc.StatusCode.CANCELLED
        )
    return grpc.StatusCode.UNKNOWN  # what grpc.aio answers for an exception it did not expect


# -- one worker's metrics, and their HTTP endpoint --------------------------------------------------


@dataclass(frozen=True)
class WorkerMetrics:
    registry: CollectorRegistry
    observer: PrometheusObserver
    interceptor: GrpcServerMetrics


def create_worker_metrics() -> WorkerMetrics:
    """A fresh registry with every worker metric (one per server)."""
    registry = CollectorRegistry()
    registry.register(DeviceMemoryCollector())
    return WorkerMetrics(registry, PrometheusObserver(registry), GrpcServerMetrics(registry))


class MetricsHttpServer:
    """`/metrics` on its own port, served from a daemon thread."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        try:
            self._httpd, self._thread = start_metrics_http(registry, host, port)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
        self.port: int = self._httpd.server_address[1]
        self._stop_lock = threading.Lock()
        self._stopped = False

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> MetricsHttpServer | None:
    """Start the metrics endpoint, or None when port is 0 (metrics off)."""
    if port == 0:
        return None
    return MetricsHttpServer(registry, host, port)
