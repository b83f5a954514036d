"""Load with attention_backend "triton" through a real server: refused on the CPU without the Triton
interpreter (INVALID_ARGUMENT saying how to enable it, nothing loaded, the server keeps serving);
with TRITON_INTERPRET=1 it loads, reports no CUDA graphs on the CPU, and its ForwardPaged logits
equal those of the same weights on the torch backend."""

from __future__ import annotations

import grpc
import pytest
import torch

from tests.triton_interpreter import needs_interpreter
from worker.pb.modelworker.v1 import worker_pb2 as pb
from worker.tensors import decode_tensor

from .harness import RunningServer, load_request, rpc_error


@pytest.fixture(scope="module")
def served(worker: RunningServer) -> RunningServer:
    worker.stub().Load(load_request("ref", "llama-a", attention_backend="torch"))
    return worker


def _model_ids(server: RunningServer) -> list[str]:
    return sorted(m.id for m in server.stub().ListModels(pb.ListModelsRequest()).models)


def _prefill(model_id: str) -> pb.ForwardPagedRequest:
    return pb.ForwardPagedRequest(
        model_id=model_id,
        input_tokens=[1, 2, 3, 4, 5, 6, 7],
        positions=[0, 1, 2, 0, 1, 2, 3],
        block_tables=[pb.BlockTable(block_ids=[4]), pb.BlockTable(block_ids=[9, 2])],
        slot_mapping=[64, 65, 66, 144, 145, 146, 147],
        context_lens=[3, 4],
        is_prefill=True,
        logits_mode=pb.LOGITS_ALL,
    )


def test_triton_on_cpu_without_the_interpreter_is_invalid_argument(
    served: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    request = load_request("t", "llama-a", attention_backend="triton")
    err = rpc_error(lambda: served.stub().Load(request))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert "attention_backend triton cannot run" in err.details()
    assert "set TRITON_INTERPRET=1" in err.details()
    assert _model_ids(served) == ["ref"]
    served.stub().ForwardPaged(_prefill("ref"))  # still serving


@needs_interpreter
def test_triton_under_the_interpreter_matches_torch(
    served: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    stub = served.stub()
    reply = stub.Load(load_request("t", "llama-a", attention_backend="triton", enforce_eager=True))
    try:
        listed = {m.id: m for m in stub.ListModels(pb.ListModelsRequest()).models}
        for m in (reply.model, listed["t"]):
            assert m.attention_backend == "triton"
            assert list(m.cuda_graph_batch_sizes) == [] and m.cuda_graph_bytes == 0
        got = decode_tensor(stub.ForwardPaged(_prefill("t")).logits)
        want = decode_tensor(stub.ForwardPaged(_prefill("ref")).logits)
        assert got.shape == want.shape == torch.Size([7, 128])
        assert float((got - want).abs().max()) <= 1e-4
    finally:
        stub.Unload(pb.UnloadRequest(model_id="t"))
