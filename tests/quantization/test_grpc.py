"""Quantized models through a real server on loopback: Load (on-the-fly int4/int8 and a GPTQ
checkpoint), ModelInfo, Forward with the contiguous cache, ForwardPaged, Unload returning the memory,
and every refused variant as INVALID_ARGUMENT that names what is wrong, with nothing loaded and the
server still serving."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.tiny_models import make_tiny_model_dir
from tests.worker.harness import SMALL_KV, RunningServer, load_request, make_settings, rpc_error, start_server
from worker.pb.modelworker.v1 import worker_pb2 as pb
from worker.tensors import decode_tensor

from . import checkpoints as ck


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("qmodels")
    make_tiny_model_dir(root / "dense", "llama", seed=5)
    ck.write_checkpoint(
        root / "gptq", ck.gptq_config(4, 32, False, True), ck.gptq_layer(4, 32, False, True), seed=6
    )
    # Broken variants of the GPTQ checkpoint.
    for name in ("gptq-bad-zeros", "gptq-unknown-method"):
        (root / name).mkdir()
        cfg = json.loads((root / "gptq" / "config.json").read_text())
        tensors = load_file(root / "gptq" / "model.safetensors")
        if name == "gptq-bad-zeros":
            key = "model.layers.1.mlp.down_proj.qzeros"
            tensors[key] = tensors[key][:, :-1].contiguous()
        else:
            cfg["quantization_config"]["quant_method"] = "bitsandbytes"
        save_file(tensors, str(root / name / "model.safetensors"), metadata={"format": "pt"})
        (root / name / "config.json").write_text(json.dumps(cfg))
    return root


@pytest.fixture(scope="module")
def server(aio_loop: asyncio.AbstractEventLoop, root: Path) -> Iterator[RunningServer]:
    running = start_server(aio_loop, make_settings(root))
    yield running
    running.stop(grace=0.5)


def _stateless(server: RunningServer, model_id: str, tokens: np.ndarray) -> torch.Tensor:
    with torch.inference_mode(), server.registry.get_model_mut(model_id) as model:
        return model.forward(torch.from_numpy(tokens), None, all_logits=True)


def test_on_the_fly_int4_through_every_forward_path_then_unload(server: RunningServer) -> None:
    stub = server.stub()
    dense = stub.Load(load_request("dense", "dense")).model
    info = stub.Load(load_request("q4", "dense", quantization="int4")).model
    assert info.quantization == "int4" and info.dtype == "bfloat16"
    assert dense.quantization == "" and info.num_parameters == dense.num_parameters
    assert info.weight_bytes < dense.weight_bytes // 2
    rng = np.random.default_rng(11)
    tokens = rng.integers(0, 128, size=(2, 7))
    stateless = _stateless(server, "q4", tokens)
    # Contiguous cache: prefill 6 then decode 1.
    stub.Forward(
        pb.ForwardRequest(
            model_id="q4", token_ids=tokens[:, :6].ravel().tolist(), batch_size=2, use_cache=True
        )
    )
    decode = stub.Forward(
        pb.ForwardRequest(
            model_id="q4", token_ids=tokens[:, 6].tolist(), batch_size=2, use_cache=True, start_pos=6
        )
    )
    scale = float(stateless.abs().max())
    assert float((decode_tensor(decode.logits) - stateless[:, 6]).abs().max()) <= 2e-2 * scale
    # Paged: both rows prefilled into blocks 3 and 5, then one decode step each.
    tables = [[3], [5]]
    prefill = stub.ForwardPaged(
        pb.ForwardPagedRequest(
            model_id="q4",
            input_tokens=tokens[:, :6].ravel().tolist(),
            positions=[p for _ in range(2) for p in range(6)],
            block_tables=[pb.BlockTable(block_ids=t) for t in tables],
            slot_mapping=[t[0] * 16 + p for t in tables for p in range(6)],
            context_lens=[6, 6],
            is_prefill=True,
        )
    )
    step = stub.ForwardPaged(
        pb.ForwardPagedRequest(
            model_id="q4",
            input_tokens=tokens[:, 6].tolist(),
            positions=[6, 6],
            block_tables=[pb.BlockTable(block_ids=t) for t in tables],
            slot_mapping=[t[0] * 16 + 6 for t in tables],
            context_lens=[7, 7],
            is_prefill=False,
        )
    )
    assert float((decode_tensor(prefill.logits) - stateless[:, 5]).abs().max()) <= 2e-2 * scale
    assert float((decode_tensor(step.logits) - stateless[:, 6]).abs().max()) <= 2e-2 * scale
    assert list(step.next_token_ids) == stateless[:, 6].argmax(-1).tolist()
    freed = stub.Unload(pb.UnloadRequest(model_id="q4")).freed_bytes
    assert freed == info.weight_bytes + info.kv_cache_bytes
    listed = {m.id for m in stub.ListModels(pb.ListModelsRequest()).models}
    assert "q4" not in listed and "dense" in listed
    stub.Unload(pb.UnloadRequest(model_id="dense"))


def test_int8_and_float32_activations_on_request(server: RunningServer) -> None:
    stub = server.stub()
    info = stub.Load(load_request("q8", "dense", quantization="int8", dtype="float32")).model
    assert info.quantization == "int8" and info.dtype == "float32"
    stub.Unload(pb.UnloadRequest(model_id="q8"))


def test_gptq_checkpoint_loads_with_its_label(server: RunningServer, root: Path) -> None:
    stub = server.stub()
    info = stub.Load(load_request("g", "gptq", is_quant_model=True)).model
    assert info.quantization == "gptq-int4-g32-act-asym" and info.is_quant_model
    tokens = list(range(3, 12))
    got = decode_tensor(stub.Forward(pb.ForwardRequest(model_id="g", token_ids=tokens)).logits)
    _, reference = ck.write_checkpoint(
        root / "gptq-again", ck.gptq_config(4, 32, False, True), ck.gptq_layer(4, 32, False, True), seed=6
    )
    with torch.no_grad():
        expected = reference(torch.tensor([tokens])).logits[:, -1]
    assert float((got - expected).abs().max()) <= 3e-2 * float(expected.abs().max())
    stub.Unload(pb.UnloadRequest(model_id="g"))


@pytest.mark.parametrize(
    ("model_dir", "fields", "needles"),
    [
        ("dense", {"is_quant_model": True}, ["is_quant_model is true", "no quantization_config"]),
        ("dense", {"quantization": "int3"}, ["quantization 'int3' is not supported"]),
        ("dense", {"quantization": "fp8"}, ["quantization 'fp8' needs a CUDA device"]),
        ("gptq", {"quantization": "int8"}, ["already quantized (gptq-int4-g32-act-asym)"]),
        ("gptq-unknown-method", {}, ["quantization_config.quant_method 'bitsandbytes'"]),
        ("gptq-bad-zeros", {}, ["model.layers.1.mlp.down_proj.qzeros", "expected int32 [4, 8]"]),
    ],
)
def test_refused_loads_name_the_problem(
    server: RunningServer, model_dir: str, fields: dict, needles: list[str]
) -> None:
    stub = server.stub()
    err = rpc_error(lambda: stub.Load(load_request("bad", model_dir, **fields)))
    assert err.code().name == "INVALID_ARGUMENT"
    for needle in needles:
        assert needle in err.details()
    assert "bad" not in {m.id for m in stub.ListModels(pb.ListModelsRequest()).models}
    # The server keeps serving.
    stub.Load(load_request("ok", "dense", kv_cache=SMALL_KV))
    assert stub.Forward(pb.ForwardRequest(model_id="ok", token_ids=[1, 2, 3])).logits.shape == [1, 128]
    stub.Unload(pb.UnloadRequest(model_id="ok"))


def test_python_client_passes_quantization(server: RunningServer) -> None:
    from worker.client import InvalidArgumentError, KvCacheConfig, ModelWorkerClient

    client = ModelWorkerClient(server.target, timeout=60)
    kv = KvCacheConfig(block_size=16, num_blocks=8, max_seq_len=32, max_batch_size=1)
    result = client.load("c8", "dense", quantization="int8", kv_cache=kv)
    assert result.model.quantization == "int8" and result.model.dtype == "bfloat16"
    with pytest.raises(InvalidArgumentError, match="quantization 'int2' is not supported"):
        client.load("c2", "dense", quantization="int2", kv_cache=kv)
    client.unload("c8")
