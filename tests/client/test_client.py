"""worker/client.py against a real worker on loopback: results decoded exactly like the in-process
model computes them (fp32, fp16, bf16), every RPC with Python types in and out, for the blocking and
the asyncio client, deadlines, auth and TLS."""

from __future__ import annotations

import asyncio
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

import architectures
from registry import KvCacheOptions, LoadOptions, Model, ModelRegistry
from tests.certs import issue, make_ca
from tests.worker.harness import RunningServer, make_settings, start_server
from worker.client import (
    AsyncModelWorkerClient,
    DeadlineExceededError,
    ForwardResult,
    KvCacheConfig,
    ModelWorkerClient,
    TlsConfig,
    UnauthenticatedError,
    UnavailableError,
    decode_tensor,
)
from worker.pb.modelworker.v1 import worker_pb2 as pb

KV = KvCacheConfig(block_size=4, num_blocks=16, max_seq_len=64, max_batch_size=2)
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@pytest.fixture
def rng() -> np.random.Generator:
    seed = random.randrange(2**31)
    print(f"seed {seed}")
    return np.random.default_rng(seed)


def reference_model(root: Path, model_dir: str, dtype: torch.dtype) -> Model:
    """The same directory loaded in this process, with the options the worker gets below."""
    registry = ModelRegistry(device="cpu", model_roots=[root])
    architectures.register_builtin(registry)
    kv = KvCacheOptions(block_size=4, num_blocks=16, max_seq_len=64, max_batch_size=2)
    options = LoadOptions(dtype=dtype, device="cpu", attention_backend="torch", kv_cache=kv)
    return registry.load("ref", model_dir, None, options).entry.model


@pytest.fixture(scope="module")
def loaded(worker: RunningServer) -> RunningServer:
    with ModelWorkerClient(worker.target, timeout=60) as c:
        c.load("m", "llama", dtype="float32", kv_cache=KV, attention_backend="torch")
        c.load("m16", "qwen", dtype="bfloat16", kv_cache=KV, attention_backend="torch")
    return worker


@pytest.fixture(scope="module")
def ref(client_model_root: Path) -> Model:
    return reference_model(client_model_root, "llama", torch.float32)


@pytest.fixture(scope="module")
def ref16(client_model_root: Path) -> Model:
    return reference_model(client_model_root, "qwen", torch.bfloat16)


def as_float32(t: torch.Tensor, dtype: str) -> np.ndarray:
    """What the wire carries for `dtype`, widened to float32 by torch (the independent reference)."""
    return t.to(TORCH_DTYPES[dtype]).float().numpy()


# -- logits and tensors ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("mode", ["last", "all"])
def test_forward_logits_decode_like_the_in_process_model(
    loaded: RunningServer, client: ModelWorkerClient, ref: Model, rng: np.random.Generator, dtype, mode
) -> None:
    ids = rng.integers(0, 128, size=(2, int(rng.integers(2, 9))))
    out = client.forward("m", ids, logits_mode=mode, logits_dtype=dtype, top_k=3)
    with torch.inference_mode():
        want = ref.forward(torch.from_numpy(ids), all_logits=mode == "all")
    rows = want.reshape(-1, 128)  # [batch * seq, vocab] or [batch, vocab], batch-major
    assert isinstance(out.logits, np.ndarray) and out.logits.dtype == np.float32
    assert out.logits_dtype == dtype
    np.testing.assert_array_equal(out.logits, as_float32(rows, dtype))
    last = want[:, -1] if mode == "all" else want
    assert out.next_token_ids == last.argmax(-1).tolist()
    assert out.compute_seconds > 0
    # top-k of every returned row, best first, from float32 logits
    logprobs = torch.log_softmax(rows.float(), -1)
    values, top_ids = torch.topk(logprobs, 3, -1)
    assert [t.token_ids for t in out.top_k] == top_ids.tolist()
    np.testing.assert_allclose([t.logprobs for t in out.top_k], values.numpy(), rtol=0, atol=1e-6)

    as_torch = client.forward("m", ids, logits_mode=mode, logits_dtype=dtype, as_torch=True)
    assert isinstance(as_torch.logits, torch.Tensor) and as_torch.logits.dtype == TORCH_DTYPES[dtype]
    assert torch.equal(as_torch.logits, rows.to(TORCH_DTYPES[dtype]))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_forward_paged_logits_decode_like_the_in_process_model(
    loaded: RunningServer, client: ModelWorkerClient, ref: Model, rng: np.random.Generator, dtype
) -> None:
    # Two prompts of 5 and 3 tokens in blocks [3, 7] and [1]; then one decode step of each.
    prompts = [rng.integers(0, 128, 5).tolist(), rng.integers(0, 128, 3).tolist()]
    tables = [[3, 7], [1]]
    slots = [3 * 4 + i for i in range(4)] + [7 * 4] + [1 * 4 + i for i in range(3)]
    prefill = dict(
        input_tokens=prompts[0] + prompts[1],
        positions=[0, 1, 2, 3, 4, 0, 1, 2],
        block_tables=tables,
        slot_mapping=slots,
        context_lens=[5, 3],
        is_prefill=True,
    )
    client.reset_cache("m")
    ref.reset_kv_cache()
    out = client.forward_paged("m", **prefill, logits_mode="all", logits_dtype=dtype)
    with torch.inference_mode():
        want = ref.forward_paged(**{k: _paged_arg(k, v) for k, v in prefill.items()}, all_logits=True)
    np.testing.assert_array_equal(out.logits, as_float32(want, dtype))
    assert out.next_token_ids == [int(want[4].argmax()), int(want[7].argmax())]

    decode = dict(
        input_tokens=out.next_token_ids,
        positions=[5, 3],
        block_tables=tables,
        slot_mapping=[7 * 4 + 1, 1 * 4 + 3],
        context_lens=[6, 4],
        is_prefill=False,
    )
    step = client.forward_paged("m", **decode, logits_dtype=dtype, as_torch=True)
    with torch.inference_mode():
        want = ref.forward_paged(**{k: _paged_arg(k, v) for k, v in decode.items()})
    assert step.logits.dtype == TORCH_DTYPES[dtype] and torch.equal(step.logits, want.to(TORCH_DTYPES[dtype]))


def _paged_arg(name: str, value):  # noqa: ANN001, ANN202 - the in-process forward_paged's argument
    if name in ("input_tokens", "positions", "slot_mapping"):
        return torch.tensor(value, dtype=torch.long)
    return value


def test_logits_none_and_a_bfloat16_kv_slice(
    loaded: RunningServer, client: ModelWorkerClient, ref16: Model, rng: np.random.Generator
) -> None:
    ids = rng.integers(0, 128, size=(2, 6))
    client.reset_cache("m16")
    ref16.reset_kv_cache()
    out = client.forward("m16", ids, use_cache=True, logits_mode="none")
    assert out.logits is None and out.logits_dtype == "" and out.top_k == []
    with torch.inference_mode():
        want = ref16.forward_with_cache(torch.from_numpy(ids), 0, 6, all_logits=False)
    assert out.next_token_ids == want.float().argmax(-1).tolist()
    for layer in (0, 1):
        kv = client.slice_kv_cache("m16", layer, 1, 4)
        kv_t = client.slice_kv_cache("m16", layer, 1, 4, as_torch=True)
        k, v = ref16.slice_kv_cache(layer, 1, 4)
        assert kv.key.shape == (2, 2, 4, 16) and kv.key.dtype == np.float32
        np.testing.assert_array_equal(kv.key, k.float().numpy())
        np.testing.assert_array_equal(kv.value, v.float().numpy())
        assert kv_t.key.dtype == torch.bfloat16 and torch.equal(kv_t.key, k) and torch.equal(kv_t.value, v)


def test_decode_tensor_special_values_and_integers(rng: np.random.Generator) -> None:
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1e-40, -3.5, 65504.0, 1e30])
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        t = torch.cat([special, torch.from_numpy(rng.standard_normal(8).astype(np.float32) * 100)]).to(dtype)
        raw = (
            t.view(torch.int16 if dtype.itemsize == 2 else torch.int32)
            .numpy()
            .astype("<i2" if dtype.itemsize == 2 else "<i4")
        )
        wire = {torch.float16: pb.FLOAT16, torch.bfloat16: pb.BFLOAT16, torch.float32: pb.FLOAT32}[dtype]
        msg = pb.Tensor(dtype=wire, shape=[2, 8], data=raw.tobytes())
        got = decode_tensor(msg)
        want = t.float().reshape(2, 8).numpy()
        np.testing.assert_array_equal(got, want)
        assert np.array_equal(np.signbit(got), np.signbit(want))  # -0.0 stays negative
        assert torch.equal(decode_tensor(msg, as_torch=True), t.reshape(2, 8))
    nan = decode_tensor(pb.Tensor(dtype=pb.BFLOAT16, shape=[1], data=np.array([0x7FC0], "<u2").tobytes()))
    assert np.isnan(nan).all()
    for wire, np_dtype in ((pb.INT32, "<i4"), (pb.INT64, "<i8")):
        values = rng.integers(-(2**31), 2**31, size=(3, 2)).astype(np_dtype)
        got = decode_tensor(pb.Tensor(dtype=wire, shape=[3, 2], data=values.tobytes()))
        assert got.dtype == np.dtype(np_dtype[1:]) and np.array_equal(got, values)
    scalar = decode_tensor(pb.Tensor(dtype=pb.FLOAT32, shape=[], data=np.float32(2.5).tobytes()))
    assert scalar.shape == () and scalar == 2.5
    with pytest.raises(ValueError, match=r"shape \[2, 3\] and dtype FLOAT16 needs 12 bytes, got 10"):
        decode_tensor(pb.Tensor(dtype=pb.FLOAT16, shape=[2, 3], data=b"\0" * 10))
    with pytest.raises(ValueError, match="tensor dtype 0 is not a known DType"):
        decode_tensor(pb.Tensor(shape=[1], data=b"\0" * 4))


# -- Python types in ---------------------------------------------------------------------------------
def test_token_inputs_of_every_kind_are_the_same_request(
    loaded: RunningServer, client: ModelWorkerClient, ref: Model, rng: np.random.Generator
) -> None:
    ids = rng.integers(0, 128, size=(2, 4))
    outs = [
        client.forward("m", form)
        for form in (ids, ids.tolist(), torch.from_numpy(ids), ids.astype(np.int16), tuple(map(tuple, ids)))
    ]
    assert all(o.next_token_ids == outs[0].next_token_ids for o in outs)
    assert all(np.array_equal(o.logits, outs[0].logits) for o in outs)
    one = client.forward("m", ids[0].tolist())
    assert one.logits.shape == (1, 128)
    # explicit positions, as in-process
    positions = np.array([[3, 4, 5, 6], [0, 2, 4, 6]])
    out = client.forward("m", ids, positions=positions)
    with torch.inference_mode():
        want = ref.forward(torch.from_numpy(ids), torch.from_numpy(positions), all_logits=False)
    np.testing.assert_array_equal(out.logits, want.numpy())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(token_ids=[[1, 2], [3]]), ValueError, "token_ids: rows of different lengths"),
        (dict(token_ids=[1.5, 2.0]), TypeError, "token_ids must hold integers, got float64"),
        (dict(token_ids=[True, False]), TypeError, "token_ids must hold integers, got bool"),
        (
            dict(token_ids=np.zeros((1, 1, 2), np.int64)),
            ValueError,
            r"token_ids must be 1-D or 2-D, got shape \[1, 1, 2\]",
        ),
        (dict(token_ids=[1, 2**31]), ValueError, r"token_ids\[1\] = 2147483648 does not fit in int32"),
        (
            dict(token_ids=[1, 2], positions=[[0, 1]]),
            ValueError,
            r"positions has shape \[1, 2\] but token_ids",
        ),
        (dict(token_ids=[1], logits_mode="first"), ValueError, "logits_mode must be one of last, all, none"),
        (dict(token_ids=[1], logits_dtype="int32"), ValueError, "logits_dtype must be one of float32"),
    ],
)
def test_inputs_that_cannot_be_encoded_fail_before_the_call(
    client: ModelWorkerClient, kwargs, error, match
) -> None:
    with pytest.raises(error, match=match):
        client.forward("m", **kwargs)


def test_paged_inputs_that_cannot_be_encoded(client: ModelWorkerClient) -> None:
    args = dict(input_tokens=[1], positions=[0], slot_mapping=[0], context_lens=[1], is_prefill=True)
    with pytest.raises(ValueError, match=r"block_tables\[1\]\[0\] = -2147483649 does not fit in int32"):
        client.forward_paged("m", block_tables=[[0], [-(2**31) - 1]], **args)
    with pytest.raises(TypeError, match="slot_mapping must hold integers"):
        client.forward_paged("m", block_tables=[[0]], **dict(args, slot_mapping=[0.0]))


# -- every RPC, blocking ------------------------------------------------------------------------------
def test_model_lifecycle_and_read_only_rpcs(loaded: RunningServer, client: ModelWorkerClient) -> None:
    assert client.health() == "SERVING"
    assert client.health("modelworker.v1.ModelWorker") == "SERVING"
    assert {"LlamaForCausalLM", "Qwen2ForCausalLM"} <= set(client.list_architectures())
    info = client.info()
    assert info.version and info.default_device == "cpu" and "torch" in info.attention_backends
    assert info.limits.max_tokens_per_request == 16384 and info.devices[0].name == "cpu"
    assert info.architectures == client.list_architectures()

    first = client.load("life", "llama", kv_cache=KvCacheConfig(block_size=8, num_blocks=4))
    assert not first.already_loaded
    m = first.model
    assert (m.id, m.architecture, m.state, m.device, m.dtype) == (
        "life",
        "LlamaForCausalLM",
        "READY",
        "cpu",
        "float32",
    )
    assert (m.vocab_size, m.hidden_size, m.num_layers, m.num_attention_heads, m.num_kv_heads, m.head_dim) == (
        128,
        64,
        2,
        4,
        2,
        16,
    )
    assert (m.kv_block_size, m.kv_num_blocks, m.max_position_embeddings, m.sliding_window) == (8, 4, 256, 0)
    assert m.num_parameters > 0 and m.weight_bytes == 4 * m.num_parameters and m.kv_cache_bytes > 0
    assert m.loaded_at is not None and m.loaded_at.tzinfo is not None and m.load_seconds > 0
    assert m.model_dir.endswith("llama") and not m.is_quant_model
    again = client.load("life", "llama", kv_cache=KvCacheConfig(block_size=8, num_blocks=4))
    assert again.already_loaded and again.model.loaded_at == m.loaded_at
    listed = {x.id: x for x in client.list_models()}
    assert listed["life"] == m and {"m", "m16"} <= set(listed)
    client.reset_cache("life")
    gone = client.unload("life")
    assert gone.freed_bytes == m.weight_bytes + m.kv_cache_bytes and gone.unload_seconds >= 0
    assert "life" not in {x.id for x in client.list_models()}


# -- deadlines, auth, TLS ---------------------------------------------------------------------------
def test_deadlines_default_and_per_call(loaded: RunningServer) -> None:
    with ModelWorkerClient(loaded.target, timeout=60) as c:
        c.load("slow", "slow-forward")  # every forward sleeps 0.5 s
    with ModelWorkerClient(loaded.target, timeout=0.2) as c:
        with pytest.raises(DeadlineExceededError) as err:
            c.forward("slow", [1, 2])  # the client's default deadline
        assert err.value.code is grpc.StatusCode.DEADLINE_EXCEEDED and err.value.method == "Forward"
        assert len(c.forward("slow", [1, 2], timeout=10).next_token_ids) == 1  # a longer one for this call
        assert c.health() == "SERVING"  # quick calls are unaffected
    with ModelWorkerClient(loaded.target) as c:  # no deadline at all
        assert len(c.forward("slow", [3]).next_token_ids) == 1
        c.unload("slow")
    with pytest.raises(ValueError, match="timeout must be > 0 seconds or None"):
        ModelWorkerClient(loaded.target, timeout=0)


@pytest.fixture(scope="module")
def authed(aio_loop: asyncio.AbstractEventLoop, client_model_root: Path) -> Iterator[RunningServer]:
    running = start_server(
        aio_loop, make_settings(client_model_root, auth_token="tok-123", grace_seconds=0.5)
    )
    yield running
    running.stop(grace=0.5)


def test_bearer_token(authed: RunningServer) -> None:
    with ModelWorkerClient(authed.target, timeout=10) as anonymous:
        assert anonymous.health() == "SERVING"  # probes stay open
        with pytest.raises(
            UnauthenticatedError, match="ListModels: UNAUTHENTICATED: missing or wrong bearer token"
        ):
            anonymous.list_models()
    with ModelWorkerClient(authed.target, timeout=10, auth_token="wrong") as wrong:
        with pytest.raises(UnauthenticatedError):
            wrong.info()
    with ModelWorkerClient(authed.target, timeout=10, auth_token="tok-123") as c:
        assert c.list_models() == [] and "LlamaForCausalLM" in c.list_architectures()

    async def async_calls() -> None:
        async with AsyncModelWorkerClient(authed.target, timeout=10, auth_token="tok-123") as c:
            assert await c.list_models() == []
        async with AsyncModelWorkerClient(authed.target, timeout=10) as c:
            with pytest.raises(UnauthenticatedError):
                await c.list_models()

    asyncio.run(async_calls())


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA; a server certificate valid only for the name worker.test (so reaching 127.0.0.1 needs the
    server-name override); a client certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl CLI")
    d = tmp_path_factory.mktemp("client-certs")
    make_ca(d)
    issue("server", "worker.test", "subjectAltName=DNS:worker.test", d)
    issue("client", "scheduler", "extendedKeyUsage=clientAuth", d)
    return d


@pytest.fixture(scope="module")
def mtls(
    aio_loop: asyncio.AbstractEventLoop, client_model_root: Path, certs: Path
) -> Iterator[RunningServer]:
    settings = make_settings(
        client_model_root,
        tls_cert=certs / "server.pem",
        tls_key=certs / "server.key",
        tls_client_ca=certs / "ca.pem",
        grace_seconds=0.5,
    )
    running = start_server(aio_loop, settings)
    yield running
    running.stop(grace=0.5)


def test_mutual_tls(mtls: RunningServer, certs: Path) -> None:
    full = TlsConfig.from_files(certs / "ca.pem", certs / "client.pem", certs / "client.key", "worker.test")
    with ModelWorkerClient(mtls.target, timeout=10, tls=full) as c:
        assert "LlamaForCausalLM" in c.list_architectures()

    async def async_call() -> list[str]:
        async with AsyncModelWorkerClient(mtls.target, timeout=10, tls=full) as c:
            return await c.list_architectures()

    assert "LlamaForCausalLM" in asyncio.run(async_call())
    refused = [
        TlsConfig.from_files(certs / "ca.pem", server_name="worker.test"),  # no client certificate
        TlsConfig.from_files(certs / "ca.pem", certs / "client.pem", certs / "client.key"),  # wrong name
        None,  # plaintext
    ]
    for tls in refused:
        with ModelWorkerClient(mtls.target, timeout=5, tls=tls) as c:
            with pytest.raises(UnavailableError):
                c.list_architectures()
    with pytest.raises(ValueError, match="mutual TLS needs both certificate_chain and private_key"):
        ModelWorkerClient(mtls.target, tls=TlsConfig(certificate_chain=b"x"))


# -- the asyncio client ------------------------------------------------------------------------------
def test_async_client_every_rpc(loaded: RunningServer, ref: Model, rng: np.random.Generator) -> None:
    ids = rng.integers(0, 128, size=(1, 5))

    async def calls() -> tuple[ForwardResult, ForwardResult, list]:
        async with AsyncModelWorkerClient(loaded.target, timeout=30) as c:
            assert await c.health() == "SERVING"
            assert "Qwen2ForCausalLM" in await c.list_architectures()
            assert (await c.info()).default_device == "cpu"
            loaded_ = await c.load("async", "llama", kv_cache=KV)
            assert loaded_.model.state == "READY" and not loaded_.already_loaded
            assert "async" in {m.id for m in await c.list_models()}
            await c.reset_cache("async")
            dense, paged = await asyncio.gather(
                c.forward("async", ids, use_cache=True, logits_dtype="bfloat16"),
                c.forward("m", ids[0], logits_dtype="float16", logits_mode="all"),
            )
            kv = await c.slice_kv_cache("async", 1, 0, 5)
            paged_out = await c.forward_paged(
                "async", ids[0], list(range(5)), [[0, 1]], list(range(5)), [5], is_prefill=True
            )
            gone = await c.unload("async")
            assert gone.freed_bytes > 0
            return dense, paged, [kv, paged_out]

    dense, all_rows, (kv, paged_out) = asyncio.run(calls())
    # Each result against the same path in process (the reference's caches start empty too).
    ref.reset_kv_cache()
    with torch.inference_mode():
        want_dense = ref.forward_with_cache(torch.from_numpy(ids), 0, 5, all_logits=False)
        want_all = ref.forward(torch.from_numpy(ids), all_logits=True)[0]
        want_paged = ref.forward_paged(
            torch.from_numpy(ids[0]), torch.arange(5), [[0, 1]], torch.arange(5), [5], True
        )
        k, _ = ref.slice_kv_cache(1, 0, 5)
    np.testing.assert_array_equal(dense.logits, as_float32(want_dense, "bfloat16"))
    np.testing.assert_array_equal(all_rows.logits, as_float32(want_all, "float16"))
    np.testing.assert_array_equal(paged_out.logits, want_paged.numpy())
    np.testing.assert_array_equal(kv.key, k.numpy())
