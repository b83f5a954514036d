"""The gRPC server metrics interceptor on a standalone grpc.aio server (real loopback calls) with
handlers of every shape and every way a call can end: return, set_code, abort, abort_with_status, an
unexpected exception, a passed deadline, a client cancel; unary, server-, client- and bidi-streaming,
async generators and the writer API. The counted code must be the one the client received."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from worker.metrics import GrpcServerMetrics, grpc_code_label

from .scrape import GO_CODE_NAMES

SERVICE = "test.v1.Probe"


class _Status(grpc.Status):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details, self.trailing_metadata = code, details, ()


async def ok(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request[::-1]


async def abort_not_found(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    raise AssertionError


async def abort_with_status(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    await context.abort_with_status(_Status(grpc.StatusCode.RESOURCE_EXHAUSTED, "full"))
    raise AssertionError


async def abort_then_linger(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    # The status leaves inside abort(); the handler is still running when the client sees it.
    try:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no")
    finally:
        await asyncio.sleep(0.5)
    raise AssertionError


async def set_code(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
    context.set_details("bad input")
    return b""


async def crash(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise ValueError("a bug")


async def slow(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    await asyncio.sleep(10)
    return b""


async def count_up(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    for i in range(int(request)):
        yield str(i).encode()


async def count_then_abort(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    yield b"0"
    await context.abort(grpc.StatusCode.OUT_OF_RANGE, "stop")


async def writer(request: bytes, context: grpc.aio.ServicerContext) -> None:
    for i in range(int(request)):
        await context.write(str(i).encode())


async def join(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
    return b"".join([r async for r in requests])


async def echo(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    async for r in requests:
        yield r


HANDLERS = {
    "Ok": grpc.unary_unary_rpc_method_handler(ok),
    "AbortNotFound": grpc.unary_unary_rpc_method_handler(abort_not_found),
    "AbortWithStatus": grpc.unary_unary_rpc_method_handler(abort_with_status),
    "AbortThenLinger": grpc.unary_unary_rpc_method_handler(abort_then_linger),
    "SetCode": grpc.unary_unary_rpc_method_handler(set_code),
    "Crash": grpc.unary_unary_rpc_method_handler(crash),
    "Slow": grpc.unary_unary_rpc_method_handler(slow),
    "CountUp": grpc.unary_stream_rpc_method_handler(count_up),
    "CountThenAbort": grpc.unary_stream_rpc_method_handler(count_then_abort),
    "Writer": grpc.unary_stream_rpc_method_handler(writer),
    "Join": grpc.stream_unary_rpc_method_handler(join),
    "Echo": grpc.stream_stream_rpc_method_handler(echo),
}


def run_against_server(scenario: Callable[[grpc.aio.Channel, GrpcServerMetrics], Awaitable[None]]) -> None:
    async def main() -> None:
        metrics = GrpcServerMetrics(CollectorRegistry())
        server = grpc.aio.server(interceptors=[metrics])
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, HANDLERS)])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await scenario(channel, metrics)
        finally:
            await server.stop(0)

    asyncio.run(main())


def handled(metrics: GrpcServerMetrics, method: str, grpc_type: str = "unary") -> dict[str, float]:
    """grpc_code -> count for one method."""
    out = {}
    for family in metrics.handled.collect():
        for s in family.samples:
            if (
                s.name == "grpc_server_handled_total"
                and s.labels["grpc_method"] == method
                and s.labels["grpc_service"] == SERVICE
            ):
                assert s.labels["grpc_type"] == grpc_type, s.labels
                out[s.labels["grpc_code"]] = s.value
    return out


def started(metrics: GrpcServerMetrics, method: str, grpc_type: str = "unary") -> float | None:
    labels = dict(grpc_type=grpc_type, grpc_service=SERVICE, grpc_method=method)
    for family in metrics.started.collect():
        for s in family.samples:
            if s.name == "grpc_server_started_total" and s.labels == labels:
                return s.value
    return None


async def code_of(call: Awaitable[Any]) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def eventually(check: Callable[[], bool], timeout: float = 3.0) -> None:
    """Cancellations reach the server after the client already gave up: wait for the count."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "the call was never counted"
        await asyncio.sleep(0.02)


def test_code_labels_follow_go_grpc_prometheus() -> None:
    for code in grpc.StatusCode:
        assert grpc_code_label(code) == GO_CODE_NAMES[code.value[0]]


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("Ok", grpc.StatusCode.OK),
        ("AbortNotFound", grpc.StatusCode.NOT_FOUND),
        ("AbortWithStatus", grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("SetCode", grpc.StatusCode.INVALID_ARGUMENT),
        ("Crash", grpc.StatusCode.UNKNOWN),
    ],
)
def test_unary_calls_count_the_code_the_client_got(method: str, expected: grpc.StatusCode) -> None:
    async def scenario(channel: grpc.aio.Channel, metrics: GrpcServerMetrics) -> None:
        for n in (1, 2):
            assert await code_of(channel.unary_unary(f"/{SERVICE}/{method}")(b"abc")) is expected
            assert started(metrics, method) == n
            assert handled(metrics, method) == {grpc_code_label(expected): n}
        histogram = metrics.handling_seconds.labels("unary", SERVICE, method)
        assert histogram.collect()[0].samples  # the timer ran for this method
        count = [s for s in histogram.collect()[0].samples if s.name.endswith("_count")]
        assert [s.value for s in count] == [2]

    run_against_server(scenario)


def test_an_abort_is_counted_before_the_client_sees_it() -> None:
    async def scenario(channel: grpc.aio.Channel, metrics: GrpcServerMetrics) -> None:
        call = channel.unary_unary(f"/{SERVICE}/AbortThenLinger")(b"")
        assert await code_of(call) is grpc.StatusCode.PERMISSION_DENIED
        assert handled(metrics, "AbortThenLinger") == {"PermissionDenied": 1}  # the handler still runs
        await asyncio.sleep(0.7)
        assert handled(metrics, "AbortThenLinger") == {"PermissionDenied": 1}  # and is not counted twice

    run_against_server(scenario)


def test_deadline_and_cancel() -> None:
    async def scenario(channel: grpc.aio.Channel, metrics: GrpcServerMetrics) -> None:
        slow_call = channel.unary_unary(f"/{SERVICE}/Slow")
        assert await code_of(slow_call(b"", timeout=0.2)) is grpc.StatusCode.DEADLINE_EXCEEDED
        await eventually(lambda: handled(metrics, "Slow") == {"DeadlineExceeded": 1})
        call = slow_call(b"")
        await asyncio.sleep(0.2)
        call.cancel()
        await eventually(lambda: handled(metrics, "Slow") == {"DeadlineExceeded": 1, "Canceled": 1})
        assert started(metrics, "Slow") == 2

    run_against_server(scenario)


def test_streaming_calls() -> None:
    async def scenario(channel: grpc.aio.Channel, metrics: GrpcServerMetrics) -> None:
        got = [m async for m in channel.unary_stream(f"/{SERVICE}/CountUp")(b"3")]
        assert got == [b"0", b"1", b"2"]
        assert handled(metrics, "CountUp", "server_stream") == {"OK": 1}

        got = [m async for m in channel.unary_stream(f"/{SERVICE}/Writer")(b"2")]
        assert got == [b"0", b"1"]
        assert handled(metrics, "Writer", "server_stream") == {"OK": 1}

        stream = channel.unary_stream(f"/{SERVICE}/CountThenAbort")(b"")
        assert await stream.read() == b"0"
        assert await code_of(stream.read()) is grpc.StatusCode.OUT_OF_RANGE
        assert handled(metrics, "CountThenAbort", "server_stream") == {"OutOfRange": 1}

        async def parts() -> AsyncIterator[bytes]:
            for p in (b"a", b"b", b"c"):
                yield p

        assert await channel.stream_unary(f"/{SERVICE}/Join")(parts()) == b"abc"
        assert handled(metrics, "Join", "client_stream") == {"OK": 1}

        got = [m async for m in channel.stream_stream(f"/{SERVICE}/Echo")(parts())]
        assert got == [b"a", b"b", b"c"]
        await eventually(lambda: handled(metrics, "Echo", "bidi_stream") == {"OK": 1})

    run_against_server(scenario)


def test_unknown_methods_make_no_series() -> None:
    """Method names of unknown calls are client text: counting them would make labels unbounded."""

    async def scenario(channel: grpc.aio.Channel, metrics: GrpcServerMetrics) -> None:
        assert await code_of(channel.unary_unary(f"/{SERVICE}/Nope")(b"")) is grpc.StatusCode.UNIMPLEMENTED
        assert await code_of(channel.unary_unary("/other.Svc/Ok")(b"")) is grpc.StatusCode.UNIMPLEMENTED
        assert await code_of(channel.unary_unary(f"/{SERVICE}/Ok")(b"x")) is grpc.StatusCode.OK
        methods = {s.labels["grpc_method"] for f in metrics.started.collect() for s in f.samples}
        assert methods == {"Ok"}

    run_against_server(scenario)
