"""SIGTERM on a real `modelworker serve` process. The slow test architecture reaches the process
through its entry point (see conftest.plugin_env), so calls can be made to last.

- Several calls in flight (forwards on three models, one more queued behind a model's lock, and a
  Load): all complete with the right answers, new calls are refused with UNAVAILABLE, health turns
  NOT_SERVING, every model is unloaded, the process exits 0 within the grace period.
- SIGTERM during a Load: the Load completes within the grace period and the process exits 0; with a
  grace period shorter than the Load, the call is cut off and the process still exits 0 (after the
  load's thread finishes, the model is unloaded), without hanging.
"""

from __future__ import annotations

import shutil
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from tests.worker import slow_arch
from worker.pb.modelworker.v1 import worker_pb2 as pb

from .common import SMALL_KV, Code, free_port, rpc_error
from .procs import ServeProcess

FORWARD_SECONDS = 1.0
LOAD_SECONDS = 1.5
SERVICE = "modelworker.v1.ModelWorker"


def make_root(tmp_path: Path, model_root: Path) -> Path:
    root = tmp_path / "models"
    root.mkdir()
    shutil.copytree(model_root / "llama", root / "fast")
    slow_arch.make_slow_copy(root / "fast", root / "slow", forward_seconds=FORWARD_SECONDS)
    slow_arch.make_slow_copy(root / "fast", root / "slow-load", load_seconds=LOAD_SECONDS)
    return root


def grace_expired(worker: ServeProcess) -> bool:
    """Whether the worker logged that its grace period ran out with calls still in flight."""
    return any(line["msg"] == "grace period over; cancelling calls" for line in worker.lines)


def wait_loading(worker: ServeProcess, model_id: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        models = worker.stub.ListModels(pb.ListModelsRequest(), timeout=5).models
        if any(m.id == model_id and m.state == pb.LOADING for m in models):
            return
        assert time.monotonic() < deadline, f"{model_id} never seen LOADING"
        time.sleep(0.01)


def wait_started(worker: ServeProcess, method: str, count: int, timeout: float = 30) -> None:
    """Until the server has started `count` calls of `method` (grpc_server_started_total on a real
    scrape): a call the server started passed the drain gate. Futures sent on one channel reach
    their handlers in any order, so the last one seen in the server does not prove the others are."""
    port = int(worker.wait_for_msg(r"^metrics on http://.*:(\d+)/metrics$").group(1))
    deadline = time.monotonic() + timeout
    label = f'grpc_method="{method}"'
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        started = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("grpc_server_started_total{") and label in line
        )
        if started >= count:
            return
        assert time.monotonic() < deadline, f"{started:.0f} of {count} {method} calls started"
        time.sleep(0.01)


def test_sigterm_with_calls_in_flight(tmp_path: Path, model_root: Path, plugin_env: dict[str, str]) -> None:
    grace = 8.0
    root = make_root(tmp_path, model_root)
    args = ("--grace-seconds", str(grace), "--metrics-port", str(free_port()))
    with ServeProcess(root, plugin_env, *args) as worker:
        stub = worker.stub
        stub.Load(pb.LoadRequest(model_id="fast", model_dir="fast", kv_cache=SMALL_KV))
        for model_id in ("s1", "s2", "s3"):
            stub.Load(pb.LoadRequest(model_id=model_id, model_dir="slow", kv_cache=SMALL_KV))
        requests = [
            pb.ForwardRequest(model_id=m, token_ids=[k + 1, 2 * k + 3, 5, 7])
            for k, m in enumerate(["s1", "s2", "s3", "s1"])  # the second s1 queues behind the first
        ]
        expected = [
            stub.Forward(pb.ForwardRequest(model_id="fast", token_ids=r.token_ids)).logits.data
            for r in requests
        ]
        forwards = [stub.Forward.future(r, timeout=30) for r in requests]
        load = stub.Load.future(pb.LoadRequest(model_id="late", model_dir="slow-load", kv_cache=SMALL_KV))
        wait_loading(worker, "late")
        wait_started(worker, "Forward", len(expected) + len(forwards))
        signaled = worker.terminate()
        worker.wait_for(lambda r: r["msg"] == "draining", timeout=5)

        refused = [
            rpc_error(lambda: stub.ListModels(pb.ListModelsRequest(), timeout=5)),
            rpc_error(lambda: stub.Forward(pb.ForwardRequest(model_id="fast", token_ids=[1]), timeout=5)),
            rpc_error(lambda: stub.Load(pb.LoadRequest(model_id="new", model_dir="fast"), timeout=5)),
        ]
        assert [e.code() for e in refused] == [Code.UNAVAILABLE] * 3
        assert all("draining" in e.details() for e in refused)
        assert worker.health(SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING

        replies = [f.result(timeout=grace) for f in forwards]
        loaded = load.result(timeout=grace)
        assert [r.logits.data for r in replies] == expected
        assert loaded.model.state == pb.READY and not loaded.already_loaded
        assert worker.proc.wait(timeout=grace + 5) == 0
        took = time.monotonic() - signaled
        unloaded = sorted(line["model"] for line in worker.lines if line["msg"] == "unloaded at shutdown")
        print(
            f"SIGTERM with {len(forwards) + 1} calls in flight ({len(forwards)} forwards of {FORWARD_SECONDS} s, "
            f"one Load of {LOAD_SECONDS} s): all completed, {len(refused)} new calls refused UNAVAILABLE, "
            f"{len(unloaded)} models unloaded, exit 0 after {took:.2f} s (grace {grace} s)"
        )
        # Drained before the grace period ran out, by the worker's own account (no wall-clock margin
        # here: process exit and interpreter teardown under a loaded machine are not the worker's).
        assert not grace_expired(worker)
        assert unloaded == ["fast", "late", "s1", "s2", "s3"]


@pytest.mark.parametrize("grace", [5.0, 0.5], ids=["load-within-grace", "grace-shorter-than-load"])
def test_sigterm_during_a_load(
    tmp_path: Path, model_root: Path, plugin_env: dict[str, str], grace: float
) -> None:
    with ServeProcess(make_root(tmp_path, model_root), plugin_env, "--grace-seconds", str(grace)) as worker:
        worker.stub.Load(pb.LoadRequest(model_id="warm", model_dir="fast", kv_cache=SMALL_KV))  # lazy imports
        worker.stub.Unload(pb.UnloadRequest(model_id="warm"))
        load = worker.stub.Load.future(pb.LoadRequest(model_id="l", model_dir="slow-load", kv_cache=SMALL_KV))
        answered: list[float] = []
        load.add_done_callback(lambda _: answered.append(time.monotonic()))
        wait_loading(worker, "l")
        signaled = worker.terminate()
        assert worker.proc.wait(timeout=grace + LOAD_SECONDS + 10) == 0
        took = time.monotonic() - signaled
        try:
            outcome = "OK" if load.result(timeout=5).model.state == pb.READY else "not READY"
        except grpc.RpcError as exc:
            outcome = exc.code().name
        cut = answered[0] - signaled
        unloaded = [line["model"] for line in worker.lines if line["msg"] == "unloaded at shutdown"]
        print(
            f"SIGTERM during a {LOAD_SECONDS} s Load, grace {grace} s: the Load got {outcome} after {cut:.2f} s; "
            f"exit 0 after {took:.2f} s; unloaded at shutdown: {unloaded}"
        )
        assert unloaded == ["l"]  # nothing half-loaded is left behind either way
        if grace > LOAD_SECONDS:
            assert outcome == "OK" and not grace_expired(worker)
        else:
            # Cut off at the end of the grace period, before the load was done (else it would be OK);
            # the process then waits for the load's thread only (it cannot be interrupted), unloads,
            # and exits (proc.wait's timeout above bounds that: no hang).
            assert outcome in ("CANCELLED", "UNAVAILABLE") and grace_expired(worker)
            msgs = [line["msg"] for line in worker.lines]
            assert msgs.index("grace period over; cancelling calls") < msgs.index("unloaded at shutdown")
