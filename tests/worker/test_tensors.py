"""The Tensor message: bytes checked against an independent little-endian encoding (numpy, and a
bit-level float32 → bfloat16 rounding), dtype enums, top-k, and the response size bound."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from registry.errors import InvalidArgument
from worker.pb.modelworker.v1 import worker_pb2 as pb
from worker.tensors import (
    decode_tensor,
    encode_tensor,
    fill_top_k,
    logits_dtype,
    logits_mode,
    logits_response_bytes,
    top_k,
)


@pytest.fixture
def rng() -> np.random.Generator:
    seed = random.randrange(2**31)
    print(f"seed {seed}")
    return np.random.default_rng(seed)


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bit patterns, round to nearest even (no NaNs in the inputs)."""
    bits = x.astype("<f4").view("<u4").astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64])
def test_encoding_matches_numpy(rng: np.random.Generator, dtype: torch.dtype) -> None:
    shape = tuple(int(d) for d in rng.integers(1, 7, size=int(rng.integers(1, 4))))
    if dtype.is_floating_point:
        source = (rng.standard_normal(shape) * 10).astype(np.float32)
        expected = {
            torch.float32: lambda: source.astype("<f4").tobytes(),
            torch.float16: lambda: source.astype("<f2").tobytes(),
            torch.bfloat16: lambda: bf16_bits(source).tobytes(),
        }[dtype]()
        t = torch.from_numpy(source).to(dtype)
    else:
        np_dtype = "<i4" if dtype == torch.int32 else "<i8"
        source = rng.integers(-(2**30), 2**30, size=shape).astype(np_dtype)
        expected = source.tobytes()
        t = torch.from_numpy(source.astype(np_dtype[1:]))
    msg = encode_tensor(t)
    assert msg.data == expected
    assert list(msg.shape) == list(shape)
    back = decode_tensor(pb.Tensor.FromString(msg.SerializeToString()))
    assert back.dtype == dtype and torch.equal(back, t)


def test_encoding_takes_non_contiguous_views() -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    assert encode_tensor(t).data == np.ascontiguousarray(t.numpy()).astype("<f4").tobytes()


def test_decode_refuses_inconsistent_messages() -> None:
    with pytest.raises(InvalidArgument, match="needs 24 bytes, got 20"):
        decode_tensor(pb.Tensor(dtype=pb.FLOAT32, shape=[2, 3], data=b"\0" * 20))
    with pytest.raises(InvalidArgument, match="dtype 0"):
        decode_tensor(pb.Tensor(shape=[1], data=b"\0" * 4))


def test_logits_enums() -> None:
    assert logits_dtype(pb.DTYPE_UNSPECIFIED) == torch.float32
    assert [logits_dtype(v) for v in (pb.FLOAT32, pb.FLOAT16, pb.BFLOAT16)] == [
        torch.float32,
        torch.float16,
        torch.bfloat16,
    ]
    for value, message in ((pb.INT32, "INT32 is not a logits type"), (pb.INT64, "INT64"), (42, "42 is not")):
        with pytest.raises(InvalidArgument, match=message):
            logits_dtype(value)
    assert logits_mode(pb.LOGITS_NONE) == pb.LOGITS_NONE
    with pytest.raises(InvalidArgument, match="logits_mode 3"):
        logits_mode(3)


def test_top_k_matches_a_float64_reference(rng: np.random.Generator) -> None:
    logits = torch.from_numpy(rng.standard_normal((4, 300)).astype(np.float32) * 5)
    ids, logprobs = top_k(logits, 7)
    x = logits.double().numpy()
    lse = np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True)) + x.max(1, keepdims=True)
    order = np.argsort(-x, axis=1, kind="stable")[:, :7]
    assert ids.tolist() == order.tolist()
    np.testing.assert_allclose(logprobs.numpy(), np.take_along_axis(x - lse, order, 1), atol=1e-5, rtol=0)
    reply = pb.ForwardResponse()
    fill_top_k(reply.top_k, ids, logprobs)
    assert [list(t.token_ids) for t in reply.top_k] == order.tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_response_size_bound_holds(rng: np.random.Generator, dtype: torch.dtype) -> None:
    rows, vocab, k, seqs = int(rng.integers(1, 40)), int(rng.integers(100, 5000)), int(rng.integers(0, 50)), 3
    logits = torch.from_numpy(rng.standard_normal((rows, vocab)).astype(np.float32))
    reply = pb.ForwardResponse(next_token_ids=[vocab - 1] * seqs, compute_seconds=1.5)
    encode_tensor(logits.to(dtype), reply.logits)
    if k:
        fill_top_k(reply.top_k, *top_k(logits, k))
    bound = logits_response_bytes(rows, vocab, dtype, k, rows, seqs)
    assert reply.ByteSize() <= bound <= reply.ByteSize() * 1.2 + 2048
