"""`modelworker serve` as operators run it: a real process with JSON logs and its metrics port. The
log has a start-up line with the effective settings (token masked), one line per Load/Unload and per
failed call with method, model, code, duration and the client's request id, and /metrics counts the
calls made."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import grpc

from tests.serve_process import ServeLog
from worker import __version__
from worker.pb.modelworker.v1 import worker_pb2 as pb
from worker.pb.modelworker.v1 import worker_pb2_grpc as pb_grpc

from .scrape import scrape
from .test_scrape import free_port


def test_serve_logs_and_metrics(model_root: Path) -> None:
    token = "tok-" + secrets.token_hex(8)
    metrics_port = free_port()
    serve = ServeLog(
        [
            "--port", "0", "--metrics-port", str(metrics_port), "--model-root", str(model_root),
            "--device", "cpu", "--auth-token", token, "--grace-seconds", "1",
        ],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        port = int(serve.wait_for_msg(r"^listening on 127\.0\.0\.1:(\d+)$").group(1))
        serve.wait_for_msg(rf"^metrics on http://127\.0\.0\.1:{metrics_port}/metrics$")
        auth = ("authorization", f"Bearer {token}")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.ModelWorkerStub(channel)
            info = stub.Load(
                pb.LoadRequest(model_id="m", model_dir="llama"), metadata=[auth, ("x-request-id", "load-1")]
            ).model
            try:
                stub.Forward(
                    pb.ForwardRequest(model_id="zz", token_ids=[1]),
                    metadata=[auth, ("x-request-id", "fwd-2")],
                )
                raise AssertionError("Forward of an unknown model succeeded")
            except grpc.RpcError as exc:
                assert exc.code() is grpc.StatusCode.NOT_FOUND
            loaded = scrape(metrics_port)
            stub.Unload(pb.UnloadRequest(model_id="m"), metadata=[auth, ("x-request-id", "unload-3")])
        unloaded = scrape(metrics_port)
    finally:
        exit_code = serve.stop()
    assert exit_code == 0, "".join(serve.raw)

    assert loaded.value("modelworker_models_loaded") == 1
    assert loaded.value("modelworker_model_weight_bytes", model="m") == info.weight_bytes
    assert loaded.value("grpc_server_handled_total", grpc_method="Load", grpc_code="OK") == 1
    assert loaded.value("grpc_server_handled_total", grpc_method="Forward", grpc_code="NotFound") == 1
    assert unloaded.value("modelworker_models_loaded") == 0
    assert unloaded.with_label("model", "m") == []

    records = serve.lines
    assert len(records) == len(serve.raw), "every line is JSON:\n" + "".join(serve.raw)
    assert token not in "".join(serve.raw)
    start = records[0]
    assert start["msg"] == f"starting modelworker {__version__}"
    assert start["auth_token"] == "***"
    assert start["metrics_port"] == metrics_port and start["port"] == 0
    assert start["model_roots"] == [str(model_root)] and start["log_format"] == "json"
    calls = {r.get("request_id"): r for r in records if "method" in r}
    for request_id, method, model, code in (
        ("load-1", "Load", "m", "OK"),
        ("fwd-2", "Forward", "zz", "NOT_FOUND"),
        ("unload-3", "Unload", "m", "OK"),
    ):
        line = calls[request_id]
        assert (line["method"], line["model"], line["code"]) == (method, model, code), line
        assert isinstance(line["duration_s"], (int, float)) and line["duration_s"] >= 0
        # a client's mistake is a warning, routine calls are info (INTERNAL is error: test_status_codes)
        assert line["level"] == ("info" if code == "OK" else "warning") and line["ts"].endswith("Z")
    assert "zz" in calls["fwd-2"]["error"]
    assert calls["load-1"]["duration_s"] >= info.load_seconds * 0.99
