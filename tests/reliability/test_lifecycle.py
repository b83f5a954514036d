"""Lifecycle under load, through a real server: 16 concurrent asyncio tasks × 50 Load/Unload cycles,
on one shared id and on an id per task, with Forwards running against the same ids on the same
channel. Only the codes the races allow come back, every answer is right, nothing deadlocks (an
overall timeout), and afterwards the registry holds exactly what the last operations imply and the
server is live and ready. Then the two orderings the issue names, made deterministic with the slow
test architecture: an Unload issued during a Load waits for it; Forwards issued during an Unload get
the right result or NOT_FOUND."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from tests.worker.harness import RunningServer, make_settings, start_server
from worker.pb.modelworker.v1 import worker_pb2 as pb
from worker.pb.modelworker.v1 import worker_pb2_grpc as pb_grpc

from .common import MINI_KV, SMALL_KV, Code, rpc_error

TASKS = 16
CYCLES = 50
FORWARD_TASKS = 4
STORM_TIMEOUT = 120.0
TOKENS = [5, 17, 33, 2, 61, 40, 9]


@pytest.fixture(scope="module")
def worker(aio_loop: asyncio.AbstractEventLoop, model_root: Path) -> Iterator[RunningServer]:
    running = start_server(aio_loop, make_settings(model_root))
    stub = running.stub()
    for model_id, model_dir in (("ref-a", "mini-a"), ("ref-b", "mini-b")):
        stub.Load(pb.LoadRequest(model_id=model_id, model_dir=model_dir, kv_cache=MINI_KV))
    yield running
    running.stop(grace=0.5)


def reference(worker: RunningServer, model_id: str) -> bytes:
    return worker.stub().Forward(pb.ForwardRequest(model_id=model_id, token_ids=TOKENS)).logits.data


async def _code(call: grpc.aio.UnaryUnaryCall) -> tuple[Code, object]:
    try:
        return Code.OK, await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc


async def run_storm(
    target: str, plans: list[tuple[str, str]], answers: dict[str, set[bytes]]
) -> tuple[Counter, list[str]]:
    """plans[i] = (model_id, model_dir) that task i loads and unloads CYCLES times. Forward tasks hit
    the planned ids until the cyclers are done. Returns counts of (op, code) and any wrong answers."""
    seen: Counter = Counter()
    wrong: list[str] = []
    done = asyncio.Event()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ModelWorkerStub(channel)

        async def cycler(model_id: str, model_dir: str) -> None:
            load = pb.LoadRequest(model_id=model_id, model_dir=model_dir, kv_cache=MINI_KV)
            for _ in range(CYCLES):
                code, reply = await _code(stub.Load(load))
                seen[("Load", code.name)] += 1
                if code is Code.OK and reply.already_loaded:
                    seen[("Load", "OK already_loaded")] += 1
                code, _ = await _code(stub.Unload(pb.UnloadRequest(model_id=model_id)))
                seen[("Unload", code.name)] += 1

        async def forwarder(seed: int) -> None:
            rng = random.Random(seed)
            ids = sorted({model_id for model_id, _ in plans})
            while not done.is_set():
                model_id = rng.choice(ids)
                code, reply = await _code(
                    stub.Forward(pb.ForwardRequest(model_id=model_id, token_ids=TOKENS))
                )
                seen[("Forward", code.name)] += 1
                if code is Code.OK and reply.logits.data not in answers[model_id]:
                    wrong.append(model_id)

        forwarders = [asyncio.create_task(forwarder(i)) for i in range(FORWARD_TASKS)]
        try:
            await asyncio.gather(*(cycler(model_id, model_dir) for model_id, model_dir in plans))
        finally:
            done.set()
            await asyncio.gather(*forwarders)
    return seen, wrong


def storm(worker: RunningServer, plans: list[tuple[str, str]], answers: dict[str, set[bytes]]) -> Counter:
    started = time.perf_counter()
    seen, wrong = asyncio.run(asyncio.wait_for(run_storm(worker.target, plans, answers), STORM_TIMEOUT))
    elapsed = time.perf_counter() - started
    loads = sum(v for (op, code), v in seen.items() if op == "Load" and code != "OK already_loaded")
    print(
        f"{len(plans)} tasks × {CYCLES} Load/Unload cycles on {len({p[0] for p in plans})} id(s) with "
        f"{FORWARD_TASKS} forward tasks: {loads} Loads in {elapsed:.1f} s; "
        + ", ".join(f"{op} {code}: {n}" for (op, code), n in sorted(seen.items()))
    )
    assert not wrong, f"{len(wrong)} forwards answered with logits of no model the id could hold"
    return seen


def assert_settled(worker: RunningServer, answers: dict[str, bytes]) -> None:
    """Only the reference models are left, READY and answering as before; no lock held or kept, no
    memory promised to a load, health SERVING."""
    models = worker.stub().ListModels(pb.ListModelsRequest()).models
    assert sorted((m.id, m.state) for m in models) == [("ref-a", pb.READY), ("ref-b", pb.READY)]
    for model_id, expected in answers.items():
        assert reference(worker, model_id) == expected
    assert worker.health() == health_pb2.HealthCheckResponse.SERVING
    assert worker.health("modelworker.v1.ModelWorker") == health_pb2.HealthCheckResponse.SERVING

    async def internals() -> tuple[list[str], dict, dict]:
        servicer = worker.server.servicer
        held = [i for i, lock in servicer._locks.items() if lock.locked()]
        return held, dict(servicer._reserved), {**servicer._lock_users, **dict.fromkeys(servicer._locks, 0)}

    held, reserved, lock_users = worker.run(internals())
    # With no call running, the lock table is empty: 800 ids' worth of locks did not accumulate.
    assert held == [] and reserved == {} and lock_users == {}


def test_cycles_on_one_shared_id(worker: RunningServer) -> None:
    """12 tasks load `shared` from one directory, 4 from another: a Load meets the id loaded with the
    other spec (ALREADY_EXISTS), being unloaded (UNAVAILABLE) or loaded (joins it); an Unload finds it
    gone (NOT_FOUND); a Forward finds it loading (UNAVAILABLE) or gone (NOT_FOUND), or answers with
    the logits of whichever model the id held."""
    refs = {"ref-a": reference(worker, "ref-a"), "ref-b": reference(worker, "ref-b")}
    plans = [("shared", "mini-a")] * 12 + [("shared", "mini-b")] * 4
    seen = storm(worker, plans, {"shared": {refs["ref-a"], refs["ref-b"]}})
    allowed = {
        "Load": {"OK", "OK already_loaded", "ALREADY_EXISTS", "UNAVAILABLE"},
        "Unload": {"OK", "NOT_FOUND"},
        "Forward": {"OK", "NOT_FOUND", "UNAVAILABLE"},
    }
    assert {k: v for k, v in seen.items() if k[1] not in allowed[k[0]]} == {}
    assert sum(v for k, v in seen.items() if k[0] == "Load" and k[1] != "OK already_loaded") == TASKS * CYCLES
    assert sum(v for k, v in seen.items() if k[0] == "Unload") == TASKS * CYCLES
    assert seen[("Load", "OK")] > 0 and seen[("Unload", "OK")] > 0 and seen[("Forward", "OK")] > 0
    assert_settled(worker, refs)


def test_cycles_on_an_id_per_task(worker: RunningServer) -> None:
    """Each task owns its id: every Load builds a new model and every Unload frees it; Forwards from
    the other tasks find the id loading, gone, or answer with the logits of its directory."""
    refs = {"ref-a": reference(worker, "ref-a"), "ref-b": reference(worker, "ref-b")}
    plans = [(f"own-{i}", "mini-a" if i % 2 else "mini-b") for i in range(TASKS)]
    answers = {
        model_id: {refs["ref-a" if model_dir == "mini-a" else "ref-b"]} for model_id, model_dir in plans
    }
    seen = storm(worker, plans, answers)
    assert seen[("Load", "OK")] == TASKS * CYCLES and seen[("Load", "OK already_loaded")] == 0
    assert seen[("Unload", "OK")] == TASKS * CYCLES
    forward_codes = {code for op, code in seen if op == "Forward"}
    assert forward_codes <= {"OK", "NOT_FOUND", "UNAVAILABLE"} and seen[("Forward", "OK")] > 0
    assert_settled(worker, refs)


def test_unload_issued_during_a_load_waits_for_it(worker: RunningServer) -> None:
    stub = worker.stub()
    load = stub.Load.future(pb.LoadRequest(model_id="sl", model_dir="mini-slow-load", kv_cache=MINI_KV))
    deadline = time.monotonic() + 10
    while not any(
        m.id == "sl" and m.state == pb.LOADING for m in stub.ListModels(pb.ListModelsRequest()).models
    ):
        assert time.monotonic() < deadline and not load.done(), "the Load was never seen LOADING"
        time.sleep(0.01)
    unload = stub.Unload.future(pb.UnloadRequest(model_id="sl"))
    loaded = load.result(timeout=30)
    load_done = time.monotonic()
    unloaded = unload.result(timeout=30)
    unload_done = time.monotonic()
    print(
        f"Unload issued during a {loaded.model.load_seconds:.2f} s Load: Load OK, Unload OK after "
        f"{unloaded.unload_seconds:.2f} s, {unloaded.freed_bytes} bytes freed"
    )
    assert not loaded.already_loaded and loaded.model.state == pb.READY
    assert unloaded.freed_bytes == loaded.model.weight_bytes + loaded.model.kv_cache_bytes
    assert unload_done >= load_done and unloaded.unload_seconds >= 0.3
    assert "sl" not in [m.id for m in stub.ListModels(pb.ListModelsRequest()).models]


def test_forwards_during_an_unload_answer_right_or_not_found(worker: RunningServer) -> None:
    """A slow Forward holds the model; an Unload queues behind it, and Forwards sent meanwhile queue
    behind the Unload. The first Forward answers right, the later ones find the model gone."""
    stub = worker.stub()
    stub.Load(pb.LoadRequest(model_id="fast", model_dir="llama", kv_cache=SMALL_KV))
    stub.Load(pb.LoadRequest(model_id="sf", model_dir="slow-forward", kv_cache=SMALL_KV))  # same weights
    request = pb.ForwardRequest(model_id="sf", token_ids=[9, 8, 7, 6])
    expected = stub.Forward(pb.ForwardRequest(model_id="fast", token_ids=[9, 8, 7, 6])).logits.data
    first = stub.Forward.future(request)
    time.sleep(0.2)  # the first forward is now in its thread (it sleeps 0.6 s)
    unload = stub.Unload.future(pb.UnloadRequest(model_id="sf"))
    later = []
    for _ in range(4):
        time.sleep(0.05)
        later.append(stub.Forward.future(request))
    assert first.result(timeout=10).logits.data == expected
    assert unload.result(timeout=10).freed_bytes > 0
    outcomes = []
    for call in later:
        try:
            outcomes.append("OK" if call.result(timeout=10).logits.data == expected else "WRONG")
        except grpc.RpcError as exc:
            outcomes.append(exc.code().name)
    print(f"Forwards sent during the Unload: {outcomes}")
    assert set(outcomes) <= {"OK", "NOT_FOUND"} and "NOT_FOUND" in outcomes
    assert rpc_error(lambda: stub.Forward(request)).code() == Code.NOT_FOUND
    stub.Unload(pb.UnloadRequest(model_id="fast"))
