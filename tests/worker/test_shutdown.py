"""`modelworker serve` as a real subprocess: start-up, preload, the `listening on` line, and SIGTERM
with a call in flight (the call completes, new calls get UNAVAILABLE, the process exits 0 in time).

The slow test architecture reaches the subprocess the way third-party architectures do: through an
entry point in the group `modelworker.architectures`, from a dist-info directory on PYTHONPATH."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.serve_process import REPO, ServeLog, plugin_env_for
from worker.pb.modelworker.v1 import worker_pb2 as pb
from worker.pb.modelworker.v1 import worker_pb2_grpc as pb_grpc

from . import slow_arch
from .harness import make_settings, start_server

GRACE = 8.0


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return plugin_env_for(tmp_path_factory.mktemp("plugin-site"))


def test_sigterm_with_a_call_in_flight(tmp_path: Path, model_root: Path, plugin_env: dict[str, str]) -> None:
    root = tmp_path / "models"
    root.mkdir()
    slow_arch.make_slow_copy(model_root / "llama-a", root / "slow", forward_seconds=2.0)
    serve = ServeLog(
        ["--port", "0", "--metrics-port", "0", "--model-root", str(root), "--preload", "s=slow",
         "--grace-seconds", str(GRACE)],
        plugin_env,
    )  # fmt: skip
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{serve.listening_port()}")
        serve.wait_for(lambda r: r["msg"] == "preloaded" and r.get("model") == "s")
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        stub = pb_grpc.ModelWorkerStub(channel)
        assert "SlowLlamaForCausalLM" in stub.ListArchitectures(pb.ListArchitecturesRequest()).architectures

        inflight = stub.Forward.future(pb.ForwardRequest(model_id="s", token_ids=[1, 2, 3]))
        time.sleep(0.5)  # the call is now in the model's thread, 1.5 s from done
        signaled = time.monotonic()
        serve.proc.send_signal(signal.SIGTERM)
        serve.wait_for(lambda r: r["msg"] == "draining", timeout=5)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ListModels(pb.ListModelsRequest())
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in refused.value.details()
        status = health.Check(health_pb2.HealthCheckRequest(service="modelworker.v1.ModelWorker")).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING

        reply = inflight.result(timeout=GRACE)
        assert len(reply.next_token_ids) == 1 and reply.compute_seconds >= 2.0
        assert serve.proc.wait(timeout=GRACE + 5) == 0
        assert time.monotonic() - signaled < GRACE
        unloaded = serve.wait_for(lambda r: r["msg"] == "unloaded at shutdown")
        assert unloaded["model"] == "s" and unloaded["freed_bytes"] > 0
        refused_line = serve.wait_for(lambda r: r.get("code") == "UNAVAILABLE")
        assert refused_line["method"] == "ListModels" and refused_line["request_id"]
    finally:
        serve.kill()


def test_preload_failure_exits_1(tmp_path: Path, plugin_env: dict[str, str]) -> None:
    serve = ServeLog(
        ["--port", "0", "--metrics-port", "0", "--model-root", str(tmp_path), "--preload", "x=absent"],
        plugin_env,
    )
    try:
        assert serve.proc.wait(timeout=60) == 1
        line = serve.wait_for(lambda r: r["msg"].startswith("preload of x"))
        assert "does not exist" in line["msg"] and line["level"] == "error"
    finally:
        serve.kill()


def test_bad_settings_exit_2_naming_the_source(plugin_env: dict[str, str]) -> None:
    env = dict(plugin_env, MODELWORKER_GRACE_SECONDS="soon")
    done = subprocess.run(
        [sys.executable, "-m", "worker", "serve"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "MODELWORKER_GRACE_SECONDS" in done.stderr and "soon" in done.stderr


def test_port_in_use_is_a_clear_error(aio_loop: asyncio.AbstractEventLoop, model_root: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            start_server(aio_loop, make_settings(model_root, port=port))
