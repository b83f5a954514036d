"""Every row of DESIGN.md's status-code table, through a real server: the code, and a message that
says what and where. After each refused Load the registry is as before and the next request works."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2
from safetensors.torch import load_file, save_file

from registry import LoadOptions, Model
from worker.pb.modelworker.v1 import worker_pb2 as pb

from .harness import RunningServer, load_request, make_settings, rpc_error, start_server

Code = grpc.StatusCode


@pytest.fixture(scope="module")
def bad_dirs(model_root: Path) -> Path:
    """Broken model directories inside the root, and a model outside it."""
    src = model_root / "llama-a"
    bad = model_root / "bad"
    bad.mkdir()
    (bad / "config").mkdir()
    (bad / "config" / "config.json").write_text("{not json")
    shutil.copy(src / "model.safetensors", bad / "config")
    shutil.copytree(src, bad / "missing-weights")
    weights = load_file(src / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, bad / "missing-weights" / "model.safetensors")
    (bad / "pickle").mkdir()
    shutil.copy(src / "config.json", bad / "pickle")
    torch.save({"x": torch.zeros(1)}, bad / "pickle" / "pytorch_model.bin")
    shutil.copytree(src, bad / "unknown-arch")
    cfg = json.loads((src / "config.json").read_text())
    (bad / "unknown-arch" / "config.json").write_text(json.dumps(dict(cfg, architectures=["FooForCausalLM"])))
    # Outside every root: a config.json that would fail to parse, so "nothing read" shows as
    # PERMISSION_DENIED rather than INVALID_ARGUMENT.
    outside = model_root.parent / "outside-model"
    outside.mkdir(exist_ok=True)
    (outside / "config.json").write_text("{this would be INVALID_ARGUMENT if it were read")
    os.symlink(outside, bad / "escape-link")
    (bad / "file-link").mkdir()
    os.symlink(outside / "config.json", bad / "file-link" / "config.json")
    shutil.copy(src / "model.safetensors", bad / "file-link")
    return bad


@pytest.fixture(scope="module")
def served(worker: RunningServer) -> RunningServer:
    worker.stub().Load(load_request("a", "llama-a"))
    return worker


def assert_status(err: grpc.RpcError, code: grpc.StatusCode, *fragments: str) -> None:
    assert err.code() == code, f"{err.code()} {err.details()}"
    for fragment in fragments:
        assert fragment in err.details(), f"{fragment!r} not in {err.details()!r}"


def model_ids(server: RunningServer) -> list[str]:
    return sorted(m.id for m in server.stub().ListModels(pb.ListModelsRequest()).models)


def forward_works(server: RunningServer, model_id: str = "a") -> None:
    reply = server.stub().Forward(pb.ForwardRequest(model_id=model_id, token_ids=[1, 2, 3]))
    assert len(reply.next_token_ids) == 1


# -- NOT_FOUND -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.Forward(pb.ForwardRequest(model_id="nope", token_ids=[1])),
        lambda s: s.ForwardPaged(
            pb.ForwardPagedRequest(
                model_id="nope",
                input_tokens=[1],
                positions=[0],
                block_tables=[pb.BlockTable(block_ids=[0])],
                slot_mapping=[0],
                context_lens=[1],
                is_prefill=True,
            )
        ),
        lambda s: s.Unload(pb.UnloadRequest(model_id="nope")),
        lambda s: s.ResetCache(pb.ResetCacheRequest(model_id="nope")),
        lambda s: s.SliceKvCache(pb.SliceKvCacheRequest(model_id="nope", length=1)),
    ],
    ids=["Forward", "ForwardPaged", "Unload", "ResetCache", "SliceKvCache"],
)
def test_unknown_model_id_is_not_found(served: RunningServer, call) -> None:
    assert_status(rpc_error(lambda: call(served.stub())), Code.NOT_FOUND, "'nope'")


def test_missing_model_dir_is_not_found(served: RunningServer) -> None:
    err = rpc_error(lambda: served.stub().Load(load_request("m", "no-such-model")))
    assert_status(err, Code.NOT_FOUND, "no-such-model", "does not exist")
    assert model_ids(served) == ["a"]


# -- ALREADY_EXISTS ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "other",
    [
        dict(model_dir="llama-b"),
        dict(model_dir="llama-a", dtype="bfloat16"),
        dict(model_dir="llama-a", kv_cache=pb.KvCacheConfig(num_blocks=8)),
    ],
    ids=["dir", "dtype", "kv_cache"],
)
def test_other_spec_is_already_exists_and_the_old_model_serves(served: RunningServer, other: dict) -> None:
    before = served.stub().Forward(pb.ForwardRequest(model_id="a", token_ids=[5, 6, 7]))
    err = rpc_error(lambda: served.stub().Load(load_request("a", **other)))
    assert_status(err, Code.ALREADY_EXISTS, "'a'", "another spec")
    after = served.stub().Forward(pb.ForwardRequest(model_id="a", token_ids=[5, 6, 7]))
    assert after.logits.data == before.logits.data


# -- INVALID_ARGUMENT ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("request_kwargs", "fragments"),
    [
        (dict(token_ids=[1, 2, 3], batch_size=2), ["len(token_ids) = 3", "batch_size 2"]),
        (dict(token_ids=[1, 2, 3], positions=[0, 1]), ["len(positions) = 2", "len(token_ids) = 3"]),
        (dict(token_ids=[]), ["token_ids is empty"]),
        (dict(token_ids=[1, 2, 128]), ["[0, 2] = 128", "vocabulary"]),
        (dict(token_ids=[1, -4]), ["[0, 1] = -4"]),
        (dict(token_ids=[1, 2], positions=[0, 256]), ["positions[0, 1] = 256", "[0, 256)"]),
        (dict(token_ids=[1], start_pos=256), ["positions", "256"]),
        (dict(token_ids=[1], logits_dtype=pb.INT32), ["logits_dtype INT32", "FLOAT32"]),
        (dict(token_ids=[1], logits_dtype=pb.INT64), ["logits_dtype INT64"]),
        (dict(token_ids=[1], logits_dtype=17), ["logits_dtype 17"]),
        (dict(token_ids=[1], logits_mode=9), ["logits_mode 9"]),
        (dict(token_ids=[1], top_k=129), ["top_k 129", "vocabulary size 128"]),
        (dict(model_id="bad/id", token_ids=[1]), ["model_id 'bad/id'"]),
        (dict(model_id="", token_ids=[1]), ["model_id ''"]),
        (dict(token_ids=[1, 2], use_cache=True, batch_size=2, start_pos=0), []),  # valid: 2 cache rows
        (dict(token_ids=[1, 2, 3], use_cache=True, batch_size=3), ["batch 3", "rows [1, 2]"]),
        (dict(token_ids=[1, 2], use_cache=True, start_pos=127), ["start_pos 127", "max_seq_len 128"]),
    ],
)
def test_malformed_forward_is_invalid_argument(
    served: RunningServer, request_kwargs: dict, fragments
) -> None:
    request = pb.ForwardRequest(**dict(dict(model_id="a"), **request_kwargs))
    if not fragments:
        served.stub().Forward(request)
        return
    assert_status(rpc_error(lambda: served.stub().Forward(request)), Code.INVALID_ARGUMENT, *fragments)
    forward_works(served)


def paged(**overrides) -> pb.ForwardPagedRequest:
    """A valid two-sequence prefill (3 + 2 tokens in blocks 4 and 9 of 64), then the overrides."""
    fields = dict(
        model_id="a",
        input_tokens=[1, 2, 3, 4, 5],
        positions=[0, 1, 2, 0, 1],
        block_tables=[pb.BlockTable(block_ids=[4]), pb.BlockTable(block_ids=[9])],
        slot_mapping=[64, 65, 66, 144, 145],
        context_lens=[3, 2],
        is_prefill=True,
    )
    fields.update(overrides)
    return pb.ForwardPagedRequest(**fields)


@pytest.mark.parametrize(
    ("request_kwargs", "code", "fragments"),
    [
        (dict(), Code.OK, []),
        (
            dict(positions=[0, 1, 2, 0]),
            Code.INVALID_ARGUMENT,
            ["len(positions) = 4", "len(input_tokens) = 5"],
        ),
        (dict(slot_mapping=[64, 65]), Code.INVALID_ARGUMENT, ["len(slot_mapping) = 2"]),
        (dict(context_lens=[5]), Code.INVALID_ARGUMENT, ["len(context_lens) = 1", "len(block_tables) = 2"]),
        (dict(query_lens=[3]), Code.INVALID_ARGUMENT, ["len(query_lens) = 1"]),
        (dict(query_lens=[3, 3]), Code.INVALID_ARGUMENT, ["add up to 6", "input_tokens has 5"]),
        (dict(block_tables=[]), Code.INVALID_ARGUMENT, ["block_tables is empty"]),
        (
            dict(block_tables=[pb.BlockTable(block_ids=[64]), pb.BlockTable(block_ids=[9])]),
            Code.INVALID_ARGUMENT,
            ["64"],
        ),
        (dict(slot_mapping=[64, 65, 66, 144, 5000]), Code.INVALID_ARGUMENT, ["slot_mapping", "5000"]),
        (dict(input_tokens=[1, 2, 3, 4, 999]), Code.INVALID_ARGUMENT, ["999"]),
        (dict(logits_dtype=pb.INT64), Code.INVALID_ARGUMENT, ["logits_dtype INT64"]),
        # KV capacity: a sequence longer than the whole paged cache (64 blocks × 16 tokens).
        (
            dict(
                input_tokens=[1],
                positions=[0],
                slot_mapping=[-1],
                context_lens=[2000],
                query_lens=[1],
                block_tables=[pb.BlockTable(block_ids=[0])],
            ),
            Code.RESOURCE_EXHAUSTED,
            ["context_len 2000", "whole paged cache"],
        ),
    ],
)
def test_forward_paged_status(served: RunningServer, request_kwargs: dict, code, fragments) -> None:
    request = paged(**request_kwargs)
    if code == Code.OK:
        reply = served.stub().ForwardPaged(request)
        assert list(reply.logits.shape) == [2, 128]
        return
    assert_status(rpc_error(lambda: served.stub().ForwardPaged(request)), code, *fragments)
    served.stub().ForwardPaged(paged())


@pytest.mark.parametrize(
    ("request_kwargs", "fragments"),
    [
        (dict(model_dir="bad/config"), ["config.json"]),
        (dict(model_dir="bad/missing-weights"), ["missing 1 weight", "model.layers.1.mlp.up_proj.weight"]),
        (dict(model_dir="bad/pickle"), ["pickle", "pytorch_model.bin"]),
        (dict(model_dir="bad/unknown-arch"), ["'FooForCausalLM'", "not registered"]),
        (dict(model_dir="llama-a", architecture="BarForCausalLM"), ["'BarForCausalLM'"]),
        (dict(model_dir="llama-a", dtype="float64"), ["dtype 'float64'"]),
        (dict(model_dir="llama-a", device="tpu"), ["device 'tpu'"]),
        (dict(model_dir="llama-a", attention_backend="xformers"), ["attention_backend 'xformers'"]),
        (dict(model_dir="llama-a", kv_cache=pb.KvCacheConfig(max_seq_len=4096)), ["max_seq_len 4096"]),
        (dict(model_dir=""), ["model_dir is empty"]),
        (dict(model_id="x" * 129, model_dir="llama-a"), ["1-128 characters"]),
        (dict(model_id="..", model_dir="llama-a"), ["reserved"]),
    ],
)
def test_malformed_load_is_invalid_argument(
    served: RunningServer, bad_dirs: Path, request_kwargs: dict, fragments
) -> None:
    request = load_request(**dict(dict(model_id="new"), **request_kwargs))
    assert_status(rpc_error(lambda: served.stub().Load(request)), Code.INVALID_ARGUMENT, *fragments)
    assert model_ids(served) == ["a"]


# -- PERMISSION_DENIED ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "model_dir",
    ["../outside-model", "bad/../../outside-model", "ABSOLUTE", "bad/escape-link", "bad/file-link"],
)
def test_paths_outside_the_roots_are_permission_denied(
    served: RunningServer, bad_dirs: Path, model_root: Path, model_dir: str
) -> None:
    if model_dir == "ABSOLUTE":
        model_dir = str(model_root.parent / "outside-model")
    err = rpc_error(lambda: served.stub().Load(load_request("esc", model_dir)))
    assert_status(err, Code.PERMISSION_DENIED, "outside the model roots")
    assert model_ids(served) == ["a"]


# -- RESOURCE_EXHAUSTED --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def capped(aio_loop: asyncio.AbstractEventLoop, model_root: Path) -> Iterator[RunningServer]:
    settings = make_settings(
        model_root,
        max_message_bytes=65536,
        max_tokens_per_request=300,
        max_batch_size=4,
        memory_budget_bytes=4 * 1024 * 1024,
    )
    running = start_server(aio_loop, settings)
    kv = pb.KvCacheConfig(block_size=16, num_blocks=64, max_seq_len=128, max_batch_size=4)
    running.stub().Load(load_request("a", "llama-a", kv_cache=kv))
    yield running
    running.stop(grace=0.5)


def test_load_over_the_memory_budget(capped: RunningServer) -> None:
    stub = capped.stub()
    held = stub.ListModels(pb.ListModelsRequest()).models[0]
    # 512 blocks × 16 tokens × 512 bytes per token = 4 MiB of KV cache: over the 4 MiB budget.
    err = rpc_error(
        lambda: stub.Load(load_request("big", "llama-b", kv_cache=pb.KvCacheConfig(num_blocks=512)))
    )
    held_bytes = held.weight_bytes + held.kv_cache_bytes
    assert_status(
        err, Code.RESOURCE_EXHAUSTED, "memory budget of 4194304 bytes", f"{held_bytes} held", "KV cache"
    )
    assert model_ids(capped) == ["a"]
    # The next request works, and a Load that fits is admitted.
    stub.Load(load_request("small", "llama-b"))
    stub.Unload(pb.UnloadRequest(model_id="small"))


def test_load_over_free_device_memory(served: RunningServer) -> None:
    # 2^32 - 1 blocks of 16 tokens: far more than this machine's memory; refused before allocating.
    request = load_request("huge", "llama-b", kv_cache=pb.KvCacheConfig(num_blocks=2**32 - 1))
    err = rpc_error(lambda: served.stub().Load(request))
    assert_status(err, Code.RESOURCE_EXHAUSTED, "bytes free", "cpu", "KV cache")
    assert model_ids(served) == ["a"]


def test_kv_budget_too_small_for_one_block(served: RunningServer) -> None:
    request = load_request("tiny-kv", "llama-b", kv_cache=pb.KvCacheConfig(max_bytes=100))
    assert_status(
        rpc_error(lambda: served.stub().Load(request)), Code.RESOURCE_EXHAUSTED, "100 bytes", "no block"
    )


@pytest.mark.parametrize(
    ("request_kwargs", "fragments"),
    [
        (dict(token_ids=[1] * 301), ["301 tokens", "cap is 300"]),
        (dict(token_ids=[1] * 5, batch_size=5), ["5 sequences", "cap is 4"]),
        (dict(token_ids=[1] * 200, logits_mode=pb.LOGITS_ALL), ["over max_message_bytes 65536", "16-bit"]),
        (
            dict(token_ids=[1] * 300, batch_size=2, logits_mode=pb.LOGITS_ALL, top_k=100),
            ["max_message_bytes"],
        ),
    ],
)
def test_requests_over_the_caps(capped: RunningServer, request_kwargs: dict, fragments) -> None:
    request = pb.ForwardRequest(model_id="a", **request_kwargs)
    assert_status(rpc_error(lambda: capped.stub().Forward(request)), Code.RESOURCE_EXHAUSTED, *fragments)
    forward_works(capped)


def test_within_the_caps_half_precision_fits(capped: RunningServer) -> None:
    # 100 rows × 128 × 2 bytes = 25.6 kB fits where float32 of 200 rows did not.
    reply = capped.stub().Forward(
        pb.ForwardRequest(
            model_id="a", token_ids=[1] * 100, logits_mode=pb.LOGITS_ALL, logits_dtype=pb.BFLOAT16
        )
    )
    assert list(reply.logits.shape) == [100, 128]


def test_paged_request_over_the_caps(capped: RunningServer) -> None:
    request = paged(
        input_tokens=[1] * 5,
        positions=[0] * 5,
        slot_mapping=[-1] * 5,
        block_tables=[pb.BlockTable(block_ids=[0])] * 5,
        context_lens=[1] * 5,
    )
    assert_status(
        rpc_error(lambda: capped.stub().ForwardPaged(request)), Code.RESOURCE_EXHAUSTED, "5 sequences"
    )


def test_request_over_max_message_bytes_is_refused_by_grpc(capped: RunningServer) -> None:
    request = pb.ForwardRequest(model_id="a", token_ids=[1000] * 40000)  # 2-byte varints: ~80 kB
    assert request.ByteSize() > 65536
    err = rpc_error(lambda: capped.stub().Forward(request))
    assert err.code() == Code.RESOURCE_EXHAUSTED
    forward_works(capped)


def test_slice_over_max_message_bytes(capped: RunningServer) -> None:
    # K and V of 4 cache rows × 2 heads × 128 positions × 16 × 4 bytes = 128 KiB: over 64 KiB.
    err = rpc_error(
        lambda: capped.stub().SliceKvCache(pb.SliceKvCacheRequest(model_id="a", layer_idx=0, length=128))
    )
    assert_status(err, Code.RESOURCE_EXHAUSTED, "take 131072 bytes", "over max_message_bytes 65536")
    reply = capped.stub().SliceKvCache(pb.SliceKvCacheRequest(model_id="a", layer_idx=0, length=32))
    assert list(reply.key.shape) == [4, 2, 32, 16]


def _raise_oom(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def test_out_of_memory_on_load(served: RunningServer) -> None:
    served.registry.register_architecture("OomForCausalLM", _raise_oom)
    request = load_request("oom", "llama-b", architecture="OomForCausalLM")
    err = rpc_error(lambda: served.stub().Load(request))
    assert_status(err, Code.RESOURCE_EXHAUSTED, "out of memory", "'oom'", "Tried to allocate")
    assert model_ids(served) == ["a"]
    served.stub().Load(load_request("after-oom", "llama-b"))
    served.stub().Unload(pb.UnloadRequest(model_id="after-oom"))


def test_out_of_memory_in_forward(served: RunningServer) -> None:
    model = served.registry.get_model("a")
    original = model.forward
    model.forward = _raise_oom  # this instance only; removed below
    try:
        err = rpc_error(lambda: forward_works(served))
    finally:
        del model.forward
    assert model.forward == original
    assert_status(err, Code.RESOURCE_EXHAUSTED, "out of memory", "'a'")
    forward_works(served)


# -- INTERNAL ------------------------------------------------------------------------------------
def test_unexpected_errors_are_internal_with_a_request_id(
    served: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    def boom(model_dir: Path, device: torch.device, options: LoadOptions) -> Model:
        raise RuntimeError("secret detail 4242")

    served.registry.register_architecture("BoomForCausalLM", boom)
    call = served.stub().Load.with_call
    with caplog.at_level(logging.INFO, logger="modelworker"):
        err = rpc_error(lambda: call(load_request("boom", "llama-b", architecture="BoomForCausalLM")))
    assert err.code() == Code.INTERNAL
    assert "secret detail" not in err.details() and "request id" in err.details()
    request_id = dict(err.trailing_metadata())["x-request-id"]
    assert request_id in err.details()
    line = next(r for r in caplog.records if getattr(r, "mw_fields", {}).get("request_id") == request_id)
    assert line.exc_info is not None and "secret detail 4242" in str(line.exc_info[1])
    assert line.mw_fields["method"] == "Load" and line.mw_fields["code"] == "INTERNAL"
    assert line.levelno == logging.ERROR
    assert model_ids(served) == ["a"]


def _raise_stop_iteration(*args, **kwargs):
    raise StopIteration  # e.g. next() on an empty iterator deep in model code


def test_stop_iteration_in_model_work_is_internal_not_a_hang(served: RunningServer) -> None:
    """An asyncio future refuses StopIteration: unconverted, the reply never came (the caller waited
    for its deadline), both for locked model work (Forward) and a Load's thread."""
    model = served.registry.get_model("a")
    model.forward = _raise_stop_iteration  # this instance only; removed below
    try:
        err = rpc_error(
            lambda: served.stub().Forward(pb.ForwardRequest(model_id="a", token_ids=[1, 2, 3]), timeout=20)
        )
    finally:
        del model.forward
    assert_status(err, Code.INTERNAL, "request id")
    forward_works(served)
    served.registry.register_architecture("StopForCausalLM", _raise_stop_iteration)
    request = load_request("stop", "llama-b", architecture="StopForCausalLM")
    err = rpc_error(lambda: served.stub().Load(request, timeout=20))
    assert_status(err, Code.INTERNAL, "request id")
    assert model_ids(served) == ["a"]


def test_client_request_id_is_used(served: RunningServer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="modelworker"):
        err = rpc_error(
            lambda: served.stub().Forward(
                pb.ForwardRequest(model_id="a", token_ids=[999]), metadata=[("x-request-id", "req-77")]
            )
        )
    assert dict(err.trailing_metadata())["x-request-id"] == "req-77"
    line = next(r for r in caplog.records if getattr(r, "mw_fields", {}).get("request_id") == "req-77")
    f = line.mw_fields
    assert (f["method"], f["model"], f["code"]) == ("Forward", "a", "INVALID_ARGUMENT") and f[
        "duration_s"
    ] >= 0
    assert line.levelno == logging.WARNING  # the client's mistake, not the worker's


# -- UNAVAILABLE ---------------------------------------------------------------------------------
def test_forward_on_a_loading_model_is_unavailable(served: RunningServer) -> None:
    done = threading.Event()
    thread = threading.Thread(
        target=lambda: (served.stub().Load(load_request("loading", "slow-load")), done.set()), daemon=True
    )
    thread.start()
    try:
        for _ in range(100):
            if "loading" in model_ids(served):
                break
            threading.Event().wait(0.02)
        err = rpc_error(lambda: served.stub().Forward(pb.ForwardRequest(model_id="loading", token_ids=[1])))
        assert_status(err, Code.UNAVAILABLE, "'loading'", "loading")
    finally:
        thread.join(30)
    assert done.is_set()
    served.stub().Unload(pb.UnloadRequest(model_id="loading"))


def test_draining_server_refuses_new_calls(aio_loop: asyncio.AbstractEventLoop, model_root: Path) -> None:
    running = start_server(aio_loop, make_settings(model_root, grace_seconds=10))
    stub = running.stub()
    stub.Load(load_request("slow", "slow-forward"))  # every forward sleeps 0.5 s
    result: dict = {}
    inflight = threading.Thread(
        target=lambda: result.update(
            reply=stub.Forward(pb.ForwardRequest(model_id="slow", token_ids=[1, 2]))
        ),
        daemon=True,
    )
    inflight.start()
    while running.server.gate.inflight == 0:
        threading.Event().wait(0.01)
    stopping = asyncio.run_coroutine_threadsafe(running.server.stop(), aio_loop)
    while not running.server.gate.draining:
        threading.Event().wait(0.01)
    err = rpc_error(lambda: stub.ListModels(pb.ListModelsRequest()))
    assert_status(err, Code.UNAVAILABLE, "draining")
    assert running.health() == health_pb2.HealthCheckResponse.NOT_SERVING
    assert running.health("modelworker.v1.ModelWorker") == health_pb2.HealthCheckResponse.NOT_SERVING
    stopping.result(15)
    inflight.join(5)
    assert len(result["reply"].next_token_ids) == 1  # the in-flight call finished normally
    assert running.registry.list_models() == []  # and the model was unloaded at shutdown


# -- UNAUTHENTICATED -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def authed(aio_loop: asyncio.AbstractEventLoop, model_root: Path) -> Iterator[RunningServer]:
    running = start_server(aio_loop, make_settings(model_root, auth_token="s3cret-token"))
    yield running
    running.stop(grace=0.5)


@pytest.mark.parametrize(
    ("metadata", "code"),
    [
        ([], Code.UNAUTHENTICATED),
        ([("authorization", "Bearer wrong")], Code.UNAUTHENTICATED),
        ([("authorization", "s3cret-token")], Code.UNAUTHENTICATED),
        ([("authorization", "Basic s3cret-token")], Code.UNAUTHENTICATED),
        ([("authorization", "Bearer s3cret-token")], Code.OK),
        ([("authorization", "bearer s3cret-token")], Code.OK),
    ],
)
def test_auth(authed: RunningServer, metadata: list, code: grpc.StatusCode) -> None:
    stub = authed.stub()
    if code == Code.OK:
        assert (
            "LlamaForCausalLM"
            in stub.ListArchitectures(pb.ListArchitecturesRequest(), metadata=metadata).architectures
        )
        return
    for call in (
        lambda: stub.ListModels(pb.ListModelsRequest(), metadata=metadata),
        lambda: stub.Load(load_request("x", "llama-a"), metadata=metadata),
    ):
        assert_status(rpc_error(call), code, "bearer token")
    assert authed.registry.list_models() == []


def test_health_stays_open_with_auth(authed: RunningServer, served: RunningServer) -> None:
    assert authed.health() == health_pb2.HealthCheckResponse.SERVING
    assert authed.health("modelworker.v1.ModelWorker") == health_pb2.HealthCheckResponse.SERVING
    # Auth off: every call is accepted without a token.
    assert served.stub().ListModels(pb.ListModelsRequest()).models


def test_reflection_needs_the_token_too(authed: RunningServer) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(authed.channel())
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    err = rpc_error(lambda: list(stub.ServerReflectionInfo(iter([request]))))
    assert err.code() == Code.UNAUTHENTICATED
    replies = list(
        stub.ServerReflectionInfo(iter([request]), metadata=[("authorization", "Bearer s3cret-token")])
    )
    names = {s.name for s in replies[0].list_services_response.service}
    assert "modelworker.v1.ModelWorker" in names
