"""A real worker on a loopback port, in this process: the grpc.aio server runs on one background
event loop shared by the session, the tests talk to it through ordinary (sync) gRPC clients."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from worker.pb.modelworker.v1 import worker_pb2 as pb
from worker.pb.modelworker.v1 import worker_pb2_grpc as pb_grpc
from worker.server import WorkerServer
from worker.settings import Settings

from . import slow_arch

T = TypeVar("T")

# Small caches: each tiny model holds 64 blocks of 16 tokens and one 128-token contiguous row.
SMALL_KV = pb.KvCacheConfig(block_size=16, num_blocks=64, max_seq_len=128, max_batch_size=2)


@dataclass
class RunningServer:
    loop: asyncio.AbstractEventLoop
    server: WorkerServer

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def registry(self):  # noqa: ANN201 - the server's ModelRegistry
        return self.server.registry

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def channel(self, **options: Any) -> grpc.Channel:
        return grpc.insecure_channel(self.target, options=list(options.items()))

    def stub(self, channel: grpc.Channel | None = None) -> pb_grpc.ModelWorkerStub:
        return pb_grpc.ModelWorkerStub(channel or self.channel())

    def health(self, service: str = "", channel: grpc.Channel | None = None) -> int:
        stub = health_pb2_grpc.HealthStub(channel or self.channel())
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    def stop(self, grace: float = 1.0) -> None:
        self.run(self.server.stop(grace))


def start_server(
    loop: asyncio.AbstractEventLoop,
    settings: Settings,
    setup: Callable[[WorkerServer], None] | None = None,
    **kwargs: Any,
) -> RunningServer:
    async def make() -> WorkerServer:
        server = WorkerServer(settings, **kwargs)  # grpc.aio objects must be made on their loop
        slow_arch.register(server.registry)
        if setup is not None:
            setup(server)
        await server.start()
        return server

    return RunningServer(loop, asyncio.run_coroutine_threadsafe(make(), loop).result(60))


def make_settings(model_root: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        port=0, metrics_port=0, device="cpu", model_roots=(model_root,), grace_seconds=2.0
    )
    values.update(overrides)
    return Settings(**values)


def load_request(model_id: str, model_dir: str, **kwargs: Any) -> pb.LoadRequest:
    kwargs.setdefault("kv_cache", SMALL_KV)
    return pb.LoadRequest(model_id=model_id, model_dir=model_dir, **kwargs)


def rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    """The RpcError a call raises (the test fails if it succeeds)."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc
    raise AssertionError("the call succeeded; an error status was expected")
