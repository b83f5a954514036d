"""LoadRequest.compile_decode over gRPC: ModelInfo.compile_seconds, decode steps equal an eager Load's,
and a host whose compiler fails turns the Load into FAILED_PRECONDITION while the worker keeps serving."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.compiler import can_compile
from tests.serve_process import ServeLog
from tests.tiny_models import make_tiny_model_dir
from worker.pb.modelworker.v1 import worker_pb2 as pb
from worker.pb.modelworker.v1 import worker_pb2_grpc as pb_grpc

from .harness import RunningServer, load_request, rpc_error


def _logits(reply: pb.ForwardResponse) -> np.ndarray:
    return np.frombuffer(reply.logits.data, dtype=np.float32)


@pytest.mark.skipif(
    not can_compile(),
    reason="torch.compile needs a C++ compiler (g++ or $CXX) and Python's headers",
)
def test_compiled_decode_steps_over_grpc_equal_an_eager_load(worker: RunningServer) -> None:
    stub = worker.stub()
    compiled = stub.Load(load_request("cd-compiled", "llama-a", compile_decode=True), timeout=120).model
    eager = stub.Load(load_request("cd-eager", "llama-a"), timeout=60).model
    try:
        assert compiled.compile_seconds > 0 and eager.compile_seconds == 0
        listed = {m.id: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
        assert listed["cd-compiled"].compile_seconds == compiled.compile_seconds
        tokens = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
        for model_id in ("cd-compiled", "cd-eager"):  # the prompt, eager in both
            stub.Forward(
                pb.ForwardRequest(model_id=model_id, token_ids=tokens[:4], use_cache=True), timeout=30
            )
        for pos in range(4, len(tokens)):
            step = pb.ForwardRequest(token_ids=[tokens[pos]], use_cache=True, start_pos=pos)
            step.model_id = "cd-compiled"
            a = stub.Forward(step, timeout=30)
            step.model_id = "cd-eager"
            b = stub.Forward(step, timeout=30)
            assert list(a.next_token_ids) == list(b.next_token_ids)
            np.testing.assert_allclose(_logits(a), _logits(b), rtol=0, atol=1e-5)
    finally:
        for model_id in ("cd-compiled", "cd-eager"):
            stub.Unload(pb.UnloadRequest(model_id=model_id), timeout=30)


def test_a_failing_compiler_is_failed_precondition_and_the_worker_keeps_serving(tmp_path: Path) -> None:
    root = tmp_path / "models"
    make_tiny_model_dir(root / "llama", "llama", seed=8)
    # A fresh inductor cache and no C++ compiler: the compile at Load must fail.
    env = {
        **os.environ,
        "CXX": str(tmp_path / "no-such-compiler"),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "ind"),
    }
    serve = ServeLog(["--port", "0", "--metrics-port", "0", "--model-root", str(root)], env=env)
    try:
        port = serve.listening_port()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.ModelWorkerStub(channel)
            err = rpc_error(lambda: stub.Load(load_request("c", "llama", compile_decode=True), timeout=120))
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
            assert "compile_decode: torch.compile failed on this host" in err.details()
            assert "load without compile_decode" in err.details()
            assert not stub.ListModels(pb.ListModelsRequest(), timeout=10).models
            plain = stub.Load(load_request("c", "llama"), timeout=60).model
            assert plain.compile_seconds == 0
            reply = stub.Forward(pb.ForwardRequest(model_id="c", token_ids=[1, 2, 3]), timeout=30)
            assert len(reply.next_token_ids) == 1
    finally:
        assert serve.stop() == 0
