"""Every gRPC status code arrives as its own exception, with the code, the details and the worker's
request id: real failures driven through a real worker, and (for the codes the worker never sends)
a grpc.aio server that aborts with whichever code it is asked for."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from registry import LoadOptions, Model
from tests.worker.harness import RunningServer
from worker.client import (
    AbortedError,
    AlreadyExistsError,
    AsyncModelWorkerClient,
    CancelledError,
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    KvCacheConfig,
    ModelWorkerClient,
    ModelWorkerClientError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    UnknownError,
    error_class_for,
)
from worker.pb.modelworker.v1 import worker_pb2 as pb
from worker.pb.modelworker.v1 import worker_pb2_grpc as pb_grpc

Code = grpc.StatusCode
# The table users read in the client's docs; written out here rather than derived from the client.
EXPECTED = {
    Code.CANCELLED: CancelledError,
    Code.UNKNOWN: UnknownError,
    Code.INVALID_ARGUMENT: InvalidArgumentError,
    Code.DEADLINE_EXCEEDED: DeadlineExceededError,
    Code.NOT_FOUND: NotFoundError,
    Code.ALREADY_EXISTS: AlreadyExistsError,
    Code.PERMISSION_DENIED: PermissionDeniedError,
    Code.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    Code.FAILED_PRECONDITION: FailedPreconditionError,
    Code.ABORTED: AbortedError,
    Code.OUT_OF_RANGE: OutOfRangeError,
    Code.UNIMPLEMENTED: UnimplementedError,
    Code.INTERNAL: InternalError,
    Code.UNAVAILABLE: UnavailableError,
    Code.DATA_LOSS: DataLossError,
    Code.UNAUTHENTICATED: UnauthenticatedError,
}


def test_the_table_covers_every_code() -> None:
    assert set(EXPECTED) == set(Code) - {Code.OK}
    for code, cls in EXPECTED.items():
        assert error_class_for(code) is cls and issubclass(cls, ModelWorkerClientError)
    assert len(set(EXPECTED.values())) == len(EXPECTED)
    with pytest.raises(ValueError, match="OK is not an error"):
        error_class_for(Code.OK)


# -- a server that aborts with any code ---------------------------------------------------------------
class AbortingServicer(pb_grpc.ModelWorkerServicer):
    """Forward fails with the status named by model_id, and a request id in the trailing metadata."""

    async def Forward(
        self, request: pb.ForwardRequest, context: grpc.aio.ServicerContext
    ) -> pb.ForwardResponse:
        code = Code[request.model_id]
        context.set_trailing_metadata((("x-request-id", f"rid-{code.value[0]}"),))
        await context.abort(code, f"aborted with {code.name} at token {len(request.token_ids)}")


@pytest.fixture(scope="module")
def aborting(aio_loop: asyncio.AbstractEventLoop) -> Iterator[str]:
    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        pb_grpc.add_ModelWorkerServicer_to_server(AbortingServicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), aio_loop).result(10)
    yield f"127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(server.stop(0), aio_loop).result(10)


def _check(err: ModelWorkerClientError, code: grpc.StatusCode) -> None:
    assert type(err) is EXPECTED[code]
    assert err.code is code and err.method == "Forward"
    assert err.details == f"aborted with {code.name} at token 3"
    assert err.request_id == f"rid-{code.value[0]}"
    assert (
        str(err)
        == f"Forward: {code.name}: aborted with {code.name} at token 3 (request id rid-{code.value[0]})"
    )


@pytest.mark.parametrize("code", sorted(EXPECTED, key=lambda c: c.value[0]), ids=lambda c: c.name)
def test_every_code_becomes_its_exception(aborting: str, code: grpc.StatusCode) -> None:
    with ModelWorkerClient(aborting, timeout=10) as client:
        with pytest.raises(ModelWorkerClientError) as err:
            client.forward(code.name, [1, 2, 3])
    _check(err.value, code)

    async def call() -> ModelWorkerClientError:
        async with AsyncModelWorkerClient(aborting, timeout=10) as client:
            try:
                await client.forward(code.name, [1, 2, 3])
            except ModelWorkerClientError as exc:
                return exc
        raise AssertionError("the call succeeded")

    _check(asyncio.run(call()), code)


def test_a_method_the_server_lacks_is_unimplemented(aborting: str) -> None:
    with ModelWorkerClient(aborting, timeout=10) as client:
        with pytest.raises(UnimplementedError) as err:
            client.list_models()
    assert err.value.method == "ListModels" and err.value.request_id is None


# -- real failures from a real worker -----------------------------------------------------------------
@pytest.fixture(scope="module")
def served(worker: RunningServer) -> RunningServer:
    with ModelWorkerClient(worker.target, timeout=60) as c:
        c.load("m", "llama", kv_cache=KvCacheConfig(block_size=4, num_blocks=8))
    return worker


def _raises(cls: type[ModelWorkerClientError], call, *fragments: str) -> ModelWorkerClientError:  # noqa: ANN001
    with pytest.raises(ModelWorkerClientError) as err:
        call()
    assert type(err.value) is cls, err.value
    for fragment in fragments:
        assert fragment in err.value.details, (fragment, err.value.details)
    return err.value


def test_not_found(served: RunningServer, client: ModelWorkerClient) -> None:
    paged = dict(
        input_tokens=[1],
        positions=[0],
        block_tables=[[0]],
        slot_mapping=[0],
        context_lens=[1],
        is_prefill=True,
    )
    for call in (
        lambda: client.forward("nope", [1]),
        lambda: client.forward_paged("nope", **paged),
        lambda: client.unload("nope"),
        lambda: client.reset_cache("nope"),
        lambda: client.slice_kv_cache("nope", 0, 0, 1),
    ):
        err = _raises(NotFoundError, call, "'nope'")
        assert err.request_id  # the worker logged the failure under this id
    _raises(NotFoundError, lambda: client.load("x", "no-such-dir"), "no-such-dir")
    _raises(NotFoundError, lambda: client.health("no.such.Service"))


def test_invalid_argument(served: RunningServer, client: ModelWorkerClient) -> None:
    _raises(InvalidArgumentError, lambda: client.forward("m", [5, 128]), "128", "vocabulary")
    _raises(
        InvalidArgumentError,
        lambda: client.forward_paged("m", [1], [0], [[8]], [32], [1], is_prefill=True),  # block 8 of 8 blocks
        "block_tables[0][0] = 8",
    )
    _raises(InvalidArgumentError, lambda: client.load("bad/id", "llama"), "bad/id")
    _raises(InvalidArgumentError, lambda: client.slice_kv_cache("m", 7, 0, 1), "layer_idx 7")
    # The client's own metadata goes with the call: the worker uses a sane x-request-id as its id.
    with ModelWorkerClient(served.target, timeout=10, metadata=[("x-request-id", "sched-42")]) as c:
        assert _raises(InvalidArgumentError, lambda: c.forward("m", [999])).request_id == "sched-42"


def test_already_exists_and_the_old_model_keeps_serving(
    served: RunningServer, client: ModelWorkerClient
) -> None:
    other = KvCacheConfig(block_size=8, num_blocks=8)
    _raises(AlreadyExistsError, lambda: client.load("m", "llama", kv_cache=other), "'m'")
    assert client.load("m", "llama", kv_cache=KvCacheConfig(block_size=4, num_blocks=8)).already_loaded
    assert len(client.forward("m", [1, 2]).next_token_ids) == 1


def test_permission_denied(served: RunningServer, client: ModelWorkerClient, client_model_root: Path) -> None:
    _raises(PermissionDeniedError, lambda: client.load("x", str(client_model_root.parent)))
    _raises(PermissionDeniedError, lambda: client.load("x", "../llama"))


def test_resource_exhausted(served: RunningServer, client: ModelWorkerClient) -> None:
    _raises(ResourceExhaustedError, lambda: client.forward("m", [0] * 16385), "16385", "16384")


def test_unavailable_while_loading_and_when_unreachable(
    served: RunningServer, client: ModelWorkerClient
) -> None:
    loading = threading.Thread(target=lambda: client.load("loading", "slow-load"), daemon=True)  # 1 s
    loading.start()
    deadline = time.monotonic() + 10
    while not any(m.id == "loading" for m in client.list_models()) and time.monotonic() < deadline:
        time.sleep(0.01)
    state = {m.id: m.state for m in client.list_models()}
    assert state["loading"] == "LOADING"
    _raises(UnavailableError, lambda: client.forward("loading", [1]), "'loading'")
    loading.join(30)
    assert {m.id: m.state for m in client.list_models()}["loading"] == "READY"
    client.unload("loading")
    with ModelWorkerClient("127.0.0.1:1", timeout=5) as nowhere:
        err = _raises(UnavailableError, nowhere.health)
    assert err.request_id is None


def test_internal_with_the_request_id(served: RunningServer, client: ModelWorkerClient) -> None:
    def boom(model_dir: Path, device: torch.device, options: LoadOptions) -> Model:
        raise RuntimeError("a detail only the log may see")

    served.registry.register_architecture("ClientBoomForCausalLM", boom)
    err = _raises(InternalError, lambda: client.load("boom", "llama", architecture="ClientBoomForCausalLM"))
    assert err.request_id and err.request_id in err.details and "only the log" not in err.details

    async def async_call() -> ModelWorkerClientError:
        async with AsyncModelWorkerClient(served.target, timeout=10) as c:
            with pytest.raises(InternalError) as exc:
                await c.load("boom", "llama", architecture="ClientBoomForCausalLM")
            return exc.value

    again = asyncio.run(async_call())
    assert again.request_id and again.request_id != err.request_id and again.request_id in again.details
