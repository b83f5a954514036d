"""The grpc.aio server: ModelWorker, health, reflection, auth, TLS and graceful shutdown.

Shutdown (SIGTERM/SIGINT, `WorkerServer.stop`): health turns NOT_SERVING and new ModelWorker calls get
UNAVAILABLE, in-flight calls get up to `grace_seconds` to finish, then the server stops, every model
is unloaded and the executor is drained.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

import architectures
from registry import ModelRegistry, load_entry_point_architectures

from .devices import resolve_default_device
from .handler_cache import WrappedHandlers
from .logs import LOGGER_NAME, fields
from .metrics import MetricsHttpServer, create_worker_metrics, serve_metrics
from .observer import NULL_OBSERVER, WorkerObserver
from .pb.modelworker.v1 import worker_pb2 as pb
from .pb.modelworker.v1 import worker_pb2_grpc as pb_grpc
from .servicer import ModelWorkerServicer
from .settings import Settings
from .status import log_call, request_id_of

log = logging.getLogger(LOGGER_NAME)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ModelWorker"].full_name  # modelworker.v1.ModelWorker
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
_SERVICE_PREFIX = f"/{SERVICE_NAME}/"
_HEALTH_PREFIX = f"/{HEALTH_SERVICE_NAME}/"
# Headroom over max_message_bytes for a response's framing (sizes are checked before the work).
SEND_HEADROOM_BYTES = 1024 * 1024
# Connections that hold a file descriptor without doing anything are closed: a TCP connection that
# has not finished the HTTP/2 (or TLS) handshake after 10 s (gRPC's default is 120 s), one idle for
# 5 minutes, and a peer that stops answering keepalive pings.
CONNECTION_OPTIONS = [
    ("grpc.server_handshake_timeout_ms", 10_000),
    ("grpc.max_connection_idle_ms", 300_000),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]
# After the grace period, unloading gets this long before the process exits with work still running.
UNLOAD_SECONDS_AFTER_GRACE = 5.0


def build_registry(settings: Settings) -> ModelRegistry:
    """The process's one registry, with the built-in and the entry-point architectures."""
    registry = ModelRegistry(device=resolve_default_device(settings.device), model_roots=settings.model_roots)
    architectures.register_builtin(registry)
    load_entry_point_architectures(registry)
    return registry


def _deny(
    handler: grpc.RpcMethodHandler, method: str, code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler:
    """A handler that fails with `code` (and logs the failed call) without reading the request: a
    request-streaming handler that never iterates, with a deserializer that keeps nothing, so a
    refused call's message (up to max_message_bytes) is neither decoded nor held."""

    async def stream_request(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        log_call(method.rsplit("/", 1)[-1], code, 0.0, request_id_of(context), message=message)
        await context.abort(code, message)

    kwargs = dict(request_deserializer=_discard, response_serializer=handler.response_serializer)
    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(stream_request, **kwargs)
    return grpc.stream_unary_rpc_method_handler(stream_request, **kwargs)


def _discard(data: bytes) -> None:
    return None


Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]]


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """`authorization: Bearer <token>` on every call except health checks (probes stay open)."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    def _authorized(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        for key, value in metadata or ():
            if key == "authorization" and isinstance(value, str):
                scheme, _, credential = value.strip().partition(" ")
                if scheme.lower() == "bearer" and hmac.compare_digest(
                    credential.strip().encode(), self._token
                ):
                    return True
        return False

    async def intercept_service(self, continuation: Continuation, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(_HEALTH_PREFIX):
            return handler
        if self._authorized(details.invocation_metadata):
            return handler
        return _deny(
            handler,
            details.method,
            grpc.StatusCode.UNAUTHENTICATED,
            "missing or wrong bearer token: send metadata 'authorization: Bearer <token>'",
        )


class CallGate(grpc.aio.ServerInterceptor):
    """Counts in-flight ModelWorker calls and refuses new ones (UNAVAILABLE) once draining."""

    def __init__(self) -> None:
        self.draining = False
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._counted = WrappedHandlers(self._count)

    async def wait_idle(self, timeout: float) -> bool:
        if self._idle.is_set():  # wait_for(..., 0) would time out before the wait could run
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def intercept_service(self, continuation: Continuation, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(_SERVICE_PREFIX):
            return handler
        if self.draining:
            return _deny(
                handler,
                details.method,
                grpc.StatusCode.UNAVAILABLE,
                "the worker is draining; send the call elsewhere",
            )
        if handler.unary_unary is None:  # every ModelWorker method is unary; nothing else to count
            return handler
        return self._counted.get(details.method, handler)

    def _count(self, _method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        behavior = handler.unary_unary

        async def counted(request: Any, context: grpc.aio.ServicerContext) -> Any:
            self.inflight += 1
            self._idle.clear()
            try:
                return await behavior(request, context)
            finally:
                self.inflight -= 1
                if self.inflight == 0:
                    self._idle.set()

        return grpc.unary_unary_rpc_method_handler(
            counted,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class WorkerServer:
    """One grpc.aio server around one registry. Its Prometheus metrics live in `self.metrics` (a registry
    of its own), served on `settings.metrics_port` once started. `observer` replaces the Prometheus
    observer; extra `interceptors` run after the metrics one, which is outermost so that it sees every
    call, denied ones included."""

    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry | None = None,
        *,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        observer: WorkerObserver = NULL_OBSERVER,
    ) -> None:
        self.settings = settings
        self.registry = registry if registry is not None else build_registry(settings)
        self.metrics = create_worker_metrics()
        if observer is NULL_OBSERVER:
            observer = self.metrics.observer
        self.metrics_http: MetricsHttpServer | None = None
        self.servicer = ModelWorkerServicer(self.registry, settings, observer)
        self.health = HealthServicer()
        self.gate = CallGate()
        chain: list[grpc.aio.ServerInterceptor] = [self.metrics.interceptor, *interceptors]
        if settings.auth_token:
            chain.append(AuthInterceptor(settings.auth_token))
        chain.append(self.gate)
        send_limit = min(settings.max_message_bytes + SEND_HEADROOM_BYTES, 2**31 - 1)
        self.server = grpc.aio.server(
            interceptors=chain,
            options=[
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", send_limit),
                ("grpc.so_reuseport", 0),
                *CONNECTION_OPTIONS,
            ],
        )
        pb_grpc.add_ModelWorkerServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = 0
        self._stopped = False
        # Set by stop() when threads were still busy at its hard bound (a Load stuck on a file, a
        # forward longer than the grace period): the process should exit without waiting for them.
        self.left_work_running = False

    @property
    def address(self) -> str:
        host = self.settings.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def _credentials(self) -> grpc.ServerCredentials | None:
        s = self.settings
        if not s.tls_enabled:
            return None
        assert s.tls_cert is not None and s.tls_key is not None
        client_ca = s.tls_client_ca.read_bytes() if s.tls_client_ca else None
        return grpc.ssl_server_credentials(
            [(s.tls_key.read_bytes(), s.tls_cert.read_bytes())],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )

    async def start(self, serving: bool = True) -> int:
        """Bind and start; returns the real port. With serving=False health stays NOT_SERVING until
        `set_serving()` (used while preloading)."""
        host = self.settings.host
        bind = f"[{host}]:{self.settings.port}" if ":" in host else f"{host}:{self.settings.port}"
        credentials = self._credentials()
        try:
            if credentials is None:
                self.port = self.server.add_insecure_port(bind)
            else:
                self.port = self.server.add_secure_port(bind, credentials)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {bind}: {exc}") from None
        await self._set_health(
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        self.metrics_http = serve_metrics(self.metrics.registry, host, self.settings.metrics_port)
        await self.server.start()
        if self.metrics_http is not None:
            shown = f"[{host}]" if ":" in host else host
            log.info("metrics on http://%s:%d/metrics", shown, self.metrics_http.port)
        log.info(
            "listening on %s",
            self.address,
            extra=fields(
                tls="mutual" if self.settings.tls_client_ca else bool(credentials),
                auth=bool(self.settings.auth_token),
            ),
        )
        return self.port

    async def _set_health(self, status: int) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def set_serving(self) -> None:
        if not self.gate.draining:
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    async def refuse_calls(self) -> None:
        """The worker cannot serve any more (a tensor-parallel rank was lost): NOT_SERVING, and new
        calls get UNAVAILABLE."""
        self.gate.draining = True
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

    async def preload(self) -> bool:
        """Load the settings' preload list; False (and a logged error) if any fails."""
        ok = True
        for model_id, model_dir in self.settings.preload:
            try:
                await self.servicer.preload(model_id, model_dir)
            except Exception as exc:
                ok = False
                log.error(
                    "preload of %s from %s failed: %s", model_id, model_dir, exc, extra=fields(model=model_id)
                )
        return ok

    async def stop(self, grace: float | None = None) -> None:
        """Drain and stop (idempotent): NOT_SERVING, refuse new calls, let in-flight ones finish
        within the grace period, stop, unload every model."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.settings.grace_seconds if grace is None else grace
        started = time.monotonic()
        self.gate.draining = True
        await self.health.enter_graceful_shutdown()
        log.info("draining", extra=fields(inflight=self.gate.inflight, grace_s=grace))
        if not await self.gate.wait_idle(grace):
            log.warning("grace period over; cancelling calls", extra=fields(inflight=self.gate.inflight))
        await self.server.stop(max(grace - (time.monotonic() - started), 0.0))
        # A hard bound: the unloads wait for threads still running a model, which may never end.
        unloading = asyncio.ensure_future(self.servicer.unload_all())
        done, _ = await asyncio.wait([unloading], timeout=UNLOAD_SECONDS_AFTER_GRACE)
        unloaded = unloading.result() if done else []
        if not done:
            self.left_work_running = True
            unloading.cancel()
            log.warning(
                "threads still busy after the grace period; exiting without waiting for them",
                extra=fields(waited_s=round(time.monotonic() - started, 3)),
            )
        self.servicer.close(wait=not self.left_work_running)
        if self.metrics_http is not None:  # last, so a scrape still works while draining
            self.metrics_http.stop()
        log.info(
            "stopped", extra=fields(unloaded=len(unloaded), duration_s=round(time.monotonic() - started, 6))
        )
