"""Cancellation and deadlines mid-Forward, through a real server. The model is the slow test
architecture (a Llama whose every forward first sleeps SLOW_FORWARD_SECONDS in its thread), so "the
call is running" is a fact the test controls. A client that cancels, or whose deadline passes, gets
CANCELLED / DEADLINE_EXCEEDED at once; the forward's thread runs to its end and the model's lock is
held until then; the next call waits for it and answers right: it continues the cache the abandoned
call filled, with the logits a fast copy of the same weights gives for the same calls."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from tests.worker.harness import RunningServer, make_settings, start_server
from worker.pb.modelworker.v1 import worker_pb2 as pb
from worker.pb.modelworker.v1 import worker_pb2_grpc as pb_grpc

from .common import SMALL_KV, Code, logits
from .conftest import SLOW_FORWARD_SECONDS

FIRST = [11, 22, 33, 44, 55, 66]
NEXT = [77, 88]
GIVE_UP_AFTER = 0.2


@pytest.fixture(scope="module")
def worker(aio_loop: asyncio.AbstractEventLoop, model_root: Path) -> Iterator[RunningServer]:
    running = start_server(aio_loop, make_settings(model_root))
    stub = running.stub()
    stub.Load(pb.LoadRequest(model_id="slow", model_dir="slow-forward", kv_cache=SMALL_KV))
    stub.Load(pb.LoadRequest(model_id="fast", model_dir="llama", kv_cache=SMALL_KV))  # the same weights
    yield running
    running.stop(grace=0.5)


def lock_held(worker: RunningServer, model_id: str) -> bool:
    async def held() -> bool:
        lock = worker.server.servicer._locks.get(model_id)
        return lock is not None and lock.locked()

    return worker.run(held())


def wait_unlocked(worker: RunningServer, model_id: str, timeout: float = 10) -> float:
    deadline = time.monotonic() + timeout
    while lock_held(worker, model_id):
        assert time.monotonic() < deadline, "the model's lock was never released"
        time.sleep(0.005)
    return time.monotonic()


def expected_continuation(worker: RunningServer) -> torch.Tensor:
    """FIRST then NEXT through the contiguous cache of the fast copy."""
    stub = worker.stub()
    stub.ResetCache(pb.ResetCacheRequest(model_id="fast"))
    stub.Forward(pb.ForwardRequest(model_id="fast", token_ids=FIRST, use_cache=True))
    reply = stub.Forward(
        pb.ForwardRequest(model_id="fast", token_ids=NEXT, use_cache=True, start_pos=len(FIRST))
    )
    return logits(reply)


def continue_slow(worker: RunningServer) -> tuple[torch.Tensor, float]:
    """The next call on the slow model (it continues the abandoned call's cache); its latency."""
    started = time.monotonic()
    reply = worker.stub().Forward(
        pb.ForwardRequest(model_id="slow", token_ids=NEXT, use_cache=True, start_pos=len(FIRST)), timeout=30
    )
    return logits(reply), time.monotonic() - started


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_abandoned_forward_holds_the_lock_until_done(worker: RunningServer, how: str) -> None:
    expected = expected_continuation(worker)
    stub = worker.stub()
    stub.ResetCache(pb.ResetCacheRequest(model_id="slow"))
    request = pb.ForwardRequest(model_id="slow", token_ids=FIRST, use_cache=True)
    started = time.monotonic()
    if how == "cancel":
        call = stub.Forward.future(request)
        time.sleep(GIVE_UP_AFTER)
        assert call.cancel()
        assert call.code() == Code.CANCELLED
    else:
        with pytest.raises(grpc.RpcError) as err:
            stub.Forward(request, timeout=GIVE_UP_AFTER)
        assert err.value.code() == Code.DEADLINE_EXCEEDED
    gave_up = time.monotonic() - started
    assert gave_up < SLOW_FORWARD_SECONDS and lock_held(worker, "slow")  # the thread still runs
    released = wait_unlocked(worker, "slow") - started
    got, latency = continue_slow(worker)
    print(
        f"{how}: client gave up after {gave_up:.2f} s; the model's lock was released after {released:.2f} s "
        f"(forward takes {SLOW_FORWARD_SECONDS} s); the next call answered right in {latency:.2f} s"
    )
    assert released >= SLOW_FORWARD_SECONDS
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    assert not lock_held(worker, "slow")


def test_next_call_waits_for_the_abandoned_one(worker: RunningServer) -> None:
    """Sent right after the deadline passed, the next call queues behind the abandoned forward (it
    takes the rest of its time plus its own) and then answers right."""
    expected = expected_continuation(worker)
    stub = worker.stub()
    stub.ResetCache(pb.ResetCacheRequest(model_id="slow"))
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        stub.Forward(
            pb.ForwardRequest(model_id="slow", token_ids=FIRST, use_cache=True), timeout=GIVE_UP_AFTER
        )
    assert err.value.code() == Code.DEADLINE_EXCEEDED
    got, _ = continue_slow(worker)
    elapsed = time.monotonic() - started
    print(
        f"deadline then next call: both done after {elapsed:.2f} s (two forwards of {SLOW_FORWARD_SECONDS} s)"
    )
    assert elapsed >= 2 * SLOW_FORWARD_SECONDS
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_asyncio_client_cancelling_paged_forwards(worker: RunningServer) -> None:
    """An asyncio client sends a paged prefill of sequence 0, then one of sequence 1 that queues
    behind it on the model's lock, and cancels both: the running one finishes in its thread, the
    queued one never runs. Then a prefill of sequence 2 is cancelled mid-forward too. A decode of
    sequences 0 and 2 answers like the fast copy that ran those two prefills, and sequence 1's block
    was never written."""
    seqs = [[(7 * s + i) % 128 for i in range(9)] for s in range(3)]

    def prefill(model_id: str, s: int) -> pb.ForwardPagedRequest:
        return pb.ForwardPagedRequest(
            model_id=model_id,
            input_tokens=seqs[s],
            positions=list(range(9)),
            block_tables=[pb.BlockTable(block_ids=[10 + s])],
            slot_mapping=[(10 + s) * 16 + i for i in range(9)],
            context_lens=[9],
            is_prefill=True,
        )

    def decode(model_id: str) -> pb.ForwardPagedRequest:
        return pb.ForwardPagedRequest(
            model_id=model_id,
            input_tokens=[1, 3],
            positions=[9, 9],
            block_tables=[pb.BlockTable(block_ids=[10]), pb.BlockTable(block_ids=[12])],
            slot_mapping=[10 * 16 + 9, 12 * 16 + 9],
            context_lens=[10, 10],
            is_prefill=False,
        )

    stub = worker.stub()
    for model_id in ("fast", "slow"):
        stub.ResetCache(pb.ResetCacheRequest(model_id=model_id))
    for s in (0, 2):
        stub.ForwardPaged(prefill("fast", s))
    expected = logits(stub.ForwardPaged(decode("fast")))

    async def cancelled(call: grpc.aio.UnaryUnaryCall) -> Code:
        call.cancel()
        try:
            await call
        except asyncio.CancelledError:
            return Code.CANCELLED
        return Code.OK

    async def run() -> tuple[list[Code], torch.Tensor]:
        async with grpc.aio.insecure_channel(worker.target) as channel:
            aio = pb_grpc.ModelWorkerStub(channel)
            running = aio.ForwardPaged(prefill("slow", 0))
            await asyncio.sleep(GIVE_UP_AFTER)
            queued = aio.ForwardPaged(prefill("slow", 1))
            await asyncio.sleep(0.1)
            codes = [await cancelled(queued), await cancelled(running)]
            assert lock_held(worker, "slow")
            wait_unlocked(worker, "slow")
            last = aio.ForwardPaged(prefill("slow", 2))
            await asyncio.sleep(GIVE_UP_AFTER)
            codes.append(await cancelled(last))
            assert lock_held(worker, "slow")
            wait_unlocked(worker, "slow")
            return codes, logits(await aio.ForwardPaged(decode("slow")))

    codes, got = asyncio.run(asyncio.wait_for(run(), 30))
    print(
        f"asyncio client: {len(codes)} paged prefills cancelled (two running, one queued), then a decode answered right"
    )
    assert codes == [Code.CANCELLED] * 3
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    with worker.registry.get_model_mut("slow") as model:
        assert not model.paged._k[:, 11].any() and not model.paged._v[:, 11].any()
        assert model.paged._k[:, 10].any() and model.paged._k[:, 12].any()
    assert not lock_held(worker, "slow")
