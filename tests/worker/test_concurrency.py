"""Concurrency through a real server: the per-model lock, model work off the event loop, Unload
waiting for in-flight work, and a storm of mixed calls from several clients."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2

from worker.pb.modelworker.v1 import worker_pb2 as pb

from .harness import RunningServer, load_request


class Instrument:
    """Wraps a model instance's forward: counts how many run at once, and can make each one slow."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active = 0
        self.max_active = 0
        self.intervals: list[tuple[float, float]] = []
        self.started = threading.Event()

    def wrap(self, model: Any, name: str = "forward", sleep: float = 0.0) -> None:
        original = getattr(model, name)

        def instrumented(*args: Any, **kwargs: Any) -> Any:
            with self.lock:
                self.active += 1
                self.max_active = max(self.max_active, self.active)
            self.started.set()
            begin = time.perf_counter()
            try:
                time.sleep(sleep)
                return original(*args, **kwargs)
            finally:
                with self.lock:
                    self.active -= 1
                    self.intervals.append((begin, time.perf_counter()))

        setattr(model, name, instrumented)


@pytest.fixture
def two_models(worker: RunningServer) -> Iterator[RunningServer]:
    stub = worker.stub()
    stub.Load(load_request("c1", "llama-a"))
    stub.Load(load_request("c2", "llama-b"))
    yield worker
    for model_id in ("c1", "c2"):
        stub.Unload(pb.UnloadRequest(model_id=model_id))


def run_threads(*targets: Callable[[], Any]) -> list[Any]:
    with ThreadPoolExecutor(len(targets)) as pool:
        return [f.result(timeout=60) for f in [pool.submit(t) for t in targets]]


def test_forwards_on_one_model_never_overlap(two_models: RunningServer) -> None:
    inst = Instrument()
    model = two_models.registry.get_model("c1")
    inst.wrap(model, "forward", sleep=0.1)
    inst.wrap(model, "forward_with_cache", sleep=0.1)
    stub = two_models.stub()
    calls = [
        lambda i=i: stub.Forward(pb.ForwardRequest(model_id="c1", token_ids=[i + 1, 2, 3])) for i in range(4)
    ]
    calls.append(lambda: stub.Forward(pb.ForwardRequest(model_id="c1", token_ids=[1, 2], use_cache=True)))
    replies = run_threads(*calls)
    assert all(len(r.next_token_ids) == 1 for r in replies)
    assert len(inst.intervals) == 5 and inst.max_active == 1
    spans = sorted(inst.intervals)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False))


def test_forwards_on_two_models_overlap(two_models: RunningServer) -> None:
    inst = Instrument()
    for model_id in ("c1", "c2"):
        inst.wrap(two_models.registry.get_model(model_id), sleep=0.4)
    stub = two_models.stub()
    run_threads(
        *[lambda m=m: stub.Forward(pb.ForwardRequest(model_id=m, token_ids=[1, 2, 3])) for m in ("c1", "c2")]
    )
    assert inst.max_active == 2  # both forwards were inside their models at the same moment


def test_reads_answer_fast_during_a_slow_load_and_a_long_forward(worker: RunningServer) -> None:
    stub = worker.stub()
    stub.Load(load_request("sf", "slow-forward"))  # each forward sleeps 0.5 s in its thread
    stub.ListModels(pb.ListModelsRequest())  # a warm connection
    worker.health()
    loads: list[pb.LoadResponse] = []
    slow = [
        lambda: loads.append(stub.Load(load_request("sl", "slow-load"))),  # the builder sleeps 1.5 s
        lambda: loads.append(stub.Load(load_request("sl", "slow-load"))),  # joins the same load
        lambda: [stub.Forward(pb.ForwardRequest(model_id="sf", token_ids=[1, 2])) for _ in range(3)],
    ]
    latencies: dict[str, list[float]] = {"ListModels": [], "health": [], "Info": []}
    saw_loading = False
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(f) for f in slow]
        time.sleep(0.1)
        while not all(f.done() for f in futures[:2]):
            t0 = time.perf_counter()
            models = stub.ListModels(pb.ListModelsRequest()).models
            latencies["ListModels"].append(time.perf_counter() - t0)
            saw_loading |= any(m.id == "sl" and m.state == pb.LOADING for m in models)
            t0 = time.perf_counter()
            assert worker.health() == health_pb2.HealthCheckResponse.SERVING
            latencies["health"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            stub.Info(pb.InfoRequest())
            latencies["Info"].append(time.perf_counter() - t0)
            time.sleep(0.02)
        for f in futures:
            f.result(timeout=30)
    assert saw_loading
    assert all(len(v) >= 10 for v in latencies.values()), latencies
    worst = {k: max(v) for k, v in latencies.items()}
    assert all(w < 0.1 for w in worst.values()), worst
    # The second Load joined the first: one built it, both report the same model.
    assert sorted(r.already_loaded for r in loads) == [False, True]
    assert loads[0].model.loaded_at == loads[1].model.loaded_at
    for model_id in ("sf", "sl"):
        stub.Unload(pb.UnloadRequest(model_id=model_id))


def test_unload_during_a_forward_waits_then_succeeds(worker: RunningServer) -> None:
    stub = worker.stub()
    stub.Load(load_request("uf", "slow-forward"))
    inst = Instrument()
    inst.wrap(worker.registry.get_model("uf"))
    with ThreadPoolExecutor(1) as pool:
        forward = pool.submit(lambda: stub.Forward(pb.ForwardRequest(model_id="uf", token_ids=[3, 4, 5])))
        assert inst.started.wait(10)
        unload = stub.Unload(pb.UnloadRequest(model_id="uf"))
        unloaded_at = time.perf_counter()
        reply = forward.result(timeout=10)
    assert len(reply.next_token_ids) == 1
    forward_end = inst.intervals[0][1]
    assert forward_end <= unloaded_at
    assert unload.freed_bytes > 0 and unload.unload_seconds > 0
    assert "uf" not in [m.id for m in stub.ListModels(pb.ListModelsRequest()).models]


def test_cancelled_forward_keeps_the_model_until_its_thread_is_done(worker: RunningServer) -> None:
    stub = worker.stub()
    stub.Load(load_request("cx", "slow-forward"))
    inst = Instrument()
    inst.wrap(worker.registry.get_model("cx"))
    err = None
    try:
        stub.Forward(pb.ForwardRequest(model_id="cx", token_ids=[1]), timeout=0.15)
    except grpc.RpcError as exc:
        err = exc
    assert err is not None and err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The deadline passed but the forward still runs; Unload must wait for it: when Unload returns,
    # the forward's thread has finished (the instrument records a forward when it ends).
    assert not inst.intervals
    stub.Unload(pb.UnloadRequest(model_id="cx"))
    assert len(inst.intervals) == 1


def test_many_clients_mixed_calls(worker: RunningServer) -> None:
    """8 clients × 50 calls of every kind on two models; every reply is checked, and the only
    errors are the ones the calls ask for (an unknown id, a token outside the vocabulary)."""
    stub = worker.stub()
    stub.Load(load_request("m1", "llama-a"))
    stub.Load(load_request("m2", "qwen"))
    requests = {
        (m, mode, dtype): pb.ForwardRequest(
            model_id=m, token_ids=[7, 8, 9, 10, 11, 12], batch_size=2, logits_mode=mode, logits_dtype=dtype
        )
        for m in ("m1", "m2")
        for mode in (pb.LOGITS_LAST, pb.LOGITS_ALL)
        for dtype in (pb.FLOAT32, pb.BFLOAT16)
    }
    # Expected logits: the same calls made in-process before the storm.
    expected = {}
    for key in requests:
        with torch.inference_mode(), worker.registry.get_model_mut(key[0]) as model:
            logits = model.forward(
                torch.tensor([[7, 8, 9], [10, 11, 12]]), None, all_logits=key[1] == pb.LOGITS_ALL
            )
        dtype = torch.bfloat16 if key[2] == pb.BFLOAT16 else torch.float32
        expected[key] = (
            logits.reshape(-1, 128).to(dtype).view(torch.int16 if key[2] == pb.BFLOAT16 else torch.int32)
        )

    def paged(client: int, model_id: str) -> pb.ForwardPagedRequest:
        block = 2 * client  # each client owns blocks 2c and 2c + 1 of every model's paged cache
        n = 20
        return pb.ForwardPagedRequest(
            model_id=model_id,
            input_tokens=[(client * 13 + i) % 128 for i in range(n)],
            positions=list(range(n)),
            block_tables=[pb.BlockTable(block_ids=[block, block + 1])],
            slot_mapping=[block * 16 + i for i in range(n)],
            context_lens=[n],
            is_prefill=True,
        )

    def client(index: int) -> Counter:
        rng = random.Random(index)
        own = worker.stub(worker.channel())
        first_paged: dict[str, bytes] = {}
        seen: Counter = Counter()
        for _ in range(50):
            op = rng.choice(
                ["forward", "forward", "forward", "paged", "paged", "list", "info", "archs", "health", "slice",
                 "reset", "reload", "ghost", "bad-token"]
            )  # fmt: skip
            model_id = rng.choice(["m1", "m2"])
            try:
                if op == "forward":
                    key = (
                        model_id,
                        rng.choice([pb.LOGITS_LAST, pb.LOGITS_ALL]),
                        rng.choice([pb.FLOAT32, pb.BFLOAT16]),
                    )
                    reply = own.Forward(requests[key])
                    got = torch.frombuffer(bytearray(reply.logits.data), dtype=expected[key].dtype)
                    assert torch.equal(got, expected[key].reshape(-1)), key
                elif op == "paged":
                    data = own.ForwardPaged(paged(index, model_id)).logits.data
                    assert first_paged.setdefault(model_id, data) == data
                elif op == "list":
                    assert {"m1", "m2"} <= {m.id for m in own.ListModels(pb.ListModelsRequest()).models}
                elif op == "info":
                    assert own.Info(pb.InfoRequest()).devices
                elif op == "archs":
                    assert own.ListArchitectures(pb.ListArchitecturesRequest()).architectures
                elif op == "health":
                    assert worker.health() == health_pb2.HealthCheckResponse.SERVING
                elif op == "slice":
                    own.SliceKvCache(pb.SliceKvCacheRequest(model_id=model_id, layer_idx=1, length=8))
                elif op == "reset":
                    own.ResetCache(pb.ResetCacheRequest(model_id=model_id))
                elif op == "reload":
                    assert own.Load(
                        load_request(model_id, "llama-a" if model_id == "m1" else "qwen")
                    ).already_loaded
                elif op == "ghost":
                    own.Forward(pb.ForwardRequest(model_id="ghost", token_ids=[1]))
                elif op == "bad-token":
                    own.Forward(pb.ForwardRequest(model_id=model_id, token_ids=[1, 500]))
                seen[(op, "OK")] += 1
            except grpc.RpcError as exc:
                seen[(op, exc.code().name)] += 1
        return seen

    with ThreadPoolExecutor(8) as pool:
        totals = sum((f.result(timeout=120) for f in [pool.submit(client, i) for i in range(8)]), Counter())
    assert sum(totals.values()) == 400
    allowed = {"ghost": "NOT_FOUND", "bad-token": "INVALID_ARGUMENT"}
    unexpected = {k: v for k, v in totals.items() if k[1] != allowed.get(k[0], "OK")}
    assert not unexpected, unexpected
    for model_id in ("m1", "m2"):
        stub.Unload(pb.UnloadRequest(model_id=model_id))
