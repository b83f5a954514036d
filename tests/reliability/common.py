"""Helpers shared by the reliability tests: status assertions, logits decoding, small KV configs."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import grpc
import torch

from worker.pb.modelworker.v1 import worker_pb2 as pb
from worker.tensors import decode_tensor

Code = grpc.StatusCode
MiB = 1024 * 1024

# Small caches so that a Load allocates little: 64 blocks of 16 tokens, two 128-token rows.
SMALL_KV = pb.KvCacheConfig(block_size=16, num_blocks=64, max_seq_len=128, max_batch_size=2)
# The minimal model's cache: 8 blocks of 16 tokens and one 64-token row.
MINI_KV = pb.KvCacheConfig(block_size=16, num_blocks=8, max_seq_len=64, max_batch_size=1)


def rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    """The RpcError a call raises (the test fails if it succeeds)."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc
    raise AssertionError("the call succeeded; an error status was expected")


def assert_status(err: grpc.RpcError, code: grpc.StatusCode, *fragments: str) -> None:
    """The code, and every fragment (what and where) in the message."""
    assert err.code() == code, f"expected {code.name}, got {err.code().name}: {err.details()}"
    for fragment in fragments:
        assert fragment in err.details(), f"{fragment!r} not in {err.details()!r}"


def logits(reply: pb.ForwardResponse | pb.ForwardPagedResponse) -> torch.Tensor:
    return decode_tensor(reply.logits)


def free_port() -> int:
    """A loopback port nothing listens on now (for a flag that takes no 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
