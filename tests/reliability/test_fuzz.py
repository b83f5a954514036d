"""Fuzzing ForwardRequest and ForwardPagedRequest against a loaded tiny model, through a real server
(hypothesis, 150 examples per RPC). Requests are drawn near the valid region (right lengths, ids in
the vocabulary, block tables that fit) and then broken in zero to three fields with values from the
whole range of their wire type, so both the checks and the model paths behind them are reached.

Every answer must be OK or a documented code (INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED), never
INTERNAL or UNKNOWN; an OK answer must be shaped as the request asked (rows, vocabulary, dtype,
next-token ids, top-k); and afterwards the server is alive and answers a known request as before."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.worker.harness import RunningServer, make_settings, start_server
from worker.pb.modelworker.v1 import worker_pb2 as pb

from .common import SMALL_KV, Code

VOCAB = 128
POSITIONS = 256
BLOCK, NUM_BLOCKS = 16, 64
EXAMPLES = 150
ALLOWED = {Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.RESOURCE_EXHAUSTED}
DTYPE_SIZE = {pb.FLOAT32: 4, pb.FLOAT16: 2, pb.BFLOAT16: 2}

INT32 = st.integers(-(2**31), 2**31 - 1)
UINT32 = st.integers(0, 2**32 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
TOKENS = st.one_of(st.integers(0, VOCAB - 1), st.integers(0, VOCAB - 1), st.integers(-2, VOCAB + 2), INT32)
POSITION = st.one_of(st.integers(0, POSITIONS - 1), st.integers(-2, POSITIONS + 2), INT32)
ENUMS = st.one_of(st.integers(0, 3), st.integers(0, 3), st.integers(-3, 12), INT32)
TOP_K = st.one_of(st.just(0), st.integers(0, VOCAB + 2), UINT32)
MODEL_IDS = st.one_of(
    st.just("a"), st.just("a"), st.just("a"), st.sampled_from(["nope", "", "../a", "x" * 129])
)


@pytest.fixture(scope="module")
def worker(aio_loop: asyncio.AbstractEventLoop, model_root: Path) -> Iterator[RunningServer]:
    running = start_server(aio_loop, make_settings(model_root))
    running.stub().Load(pb.LoadRequest(model_id="a", model_dir="llama", kv_cache=SMALL_KV))
    yield running
    running.stop(grace=0.5)


def broken_fields(breakers: dict[str, st.SearchStrategy]) -> st.SearchStrategy[list[str]]:
    """Names of the fields to break: none a fifth of the time, else one to three."""
    return st.sampled_from([0, 1, 1, 2, 3]).flatmap(
        lambda k: st.lists(st.sampled_from(sorted(breakers)), min_size=k, max_size=k, unique=True)
    )


@st.composite
def forward_requests(draw: st.DrawFn) -> pb.ForwardRequest:
    """A valid call (1-2 rows of 1-12 tokens; the cache from position 0), then up to three fields
    broken."""
    batch = draw(st.integers(1, 2))
    n = batch * draw(st.integers(1, 12))
    use_cache = draw(st.booleans())
    fields: dict[str, Any] = dict(
        model_id="a",
        token_ids=draw(st.lists(st.integers(0, VOCAB - 1), min_size=n, max_size=n)),
        batch_size=draw(st.sampled_from([0, batch])) if batch == 1 else batch,
        positions=draw(
            st.one_of(st.just([]), st.lists(st.integers(0, POSITIONS - 1), min_size=n, max_size=n))
        ),
        use_cache=use_cache,
        start_pos=0 if use_cache else draw(st.integers(0, 100)),
        logits_mode=draw(st.integers(0, 2)),
        logits_dtype=draw(st.integers(0, 3)),
        top_k=draw(st.one_of(st.just(0), st.integers(0, VOCAB))),
    )
    breakers = {
        "model_id": MODEL_IDS,
        "token_ids": st.lists(TOKENS, max_size=40),
        "batch_size": st.one_of(st.integers(0, 5), UINT32),
        "positions": st.lists(POSITION, max_size=40),
        "use_cache": st.booleans(),
        "start_pos": st.one_of(st.integers(0, 130), UINT32),
        "logits_mode": ENUMS,
        "logits_dtype": ENUMS,
        "top_k": TOP_K,
    }
    for name in draw(broken_fields(breakers)):
        if name in ("token_ids", "positions") and fields[name] and draw(st.booleans()):
            # One entry replaced: the lengths still agree, the value may be wrong.
            i = draw(st.integers(0, len(fields[name]) - 1))
            fields[name][i] = draw(TOKENS if name == "token_ids" else POSITION)
        else:
            fields[name] = draw(breakers[name])
    return pb.ForwardRequest(**fields)


@st.composite
def paged_requests(draw: st.DrawFn) -> pb.ForwardPagedRequest:
    """A valid call of 1-3 sequences on distinct blocks, then up to three fields broken."""
    is_prefill = draw(st.booleans())
    free = list(range(NUM_BLOCKS))
    fields: dict[str, Any] = dict(
        input_tokens=[], positions=[], slot_mapping=[], block_tables=[], context_lens=[], query_lens=[]
    )
    for _ in range(draw(st.integers(1, 3))):
        context = draw(st.integers(1, 40))
        query = draw(st.integers(1, context)) if is_prefill else 1
        table = [free.pop(draw(st.integers(0, len(free) - 1))) for _ in range(-(-context // BLOCK))]
        fields["block_tables"].append(table)
        fields["context_lens"].append(context)
        fields["query_lens"].append(query)
        for j in range(context - query, context):
            fields["input_tokens"].append(draw(st.integers(0, VOCAB - 1)))
            fields["positions"].append(j)
            fields["slot_mapping"].append(
                draw(st.sampled_from([table[j // BLOCK] * BLOCK + j % BLOCK] * 3 + [-1]))
            )
    if is_prefill and draw(st.booleans()) and fields["query_lens"] == fields["context_lens"]:
        fields["query_lens"] = []  # the default for a plain prefill
    fields.update(
        model_id="a",
        is_prefill=is_prefill,
        logits_mode=draw(st.integers(0, 2)),
        logits_dtype=draw(st.integers(0, 3)),
        top_k=draw(st.one_of(st.just(0), st.integers(0, VOCAB))),
    )
    breakers = {
        "model_id": MODEL_IDS,
        "input_tokens": st.lists(TOKENS, max_size=50),
        "positions": st.lists(POSITION, max_size=50),
        "slot_mapping": st.lists(st.one_of(st.integers(-2, NUM_BLOCKS * BLOCK + 2), INT64), max_size=50),
        "block_tables": st.lists(
            st.lists(st.one_of(st.integers(-1, NUM_BLOCKS), INT32), max_size=4), max_size=4
        ),
        "context_lens": st.lists(st.one_of(st.integers(-1, 60), INT32), max_size=4),
        "query_lens": st.lists(st.one_of(st.integers(-1, 60), INT32), max_size=4),
        "is_prefill": st.booleans(),
        "logits_mode": ENUMS,
        "logits_dtype": ENUMS,
        "top_k": TOP_K,
    }
    for name in draw(broken_fields(breakers)):
        if name in ("input_tokens", "positions", "slot_mapping") and fields[name] and draw(st.booleans()):
            # One entry replaced: the lengths still agree, the value may be wrong.
            i = draw(st.integers(0, len(fields[name]) - 1))
            fields[name][i] = draw(breakers[name].filter(bool))[0]
        else:
            fields[name] = draw(breakers[name])
    fields["block_tables"] = [pb.BlockTable(block_ids=t) for t in fields["block_tables"]]
    return pb.ForwardPagedRequest(**fields)


def check_reply(reply: Any, rows: int, seqs: int, request: Any) -> None:
    """An OK reply is shaped as asked."""
    mode, dtype = request.logits_mode, request.logits_dtype or pb.FLOAT32
    assert len(reply.next_token_ids) == seqs and all(0 <= t < VOCAB for t in reply.next_token_ids)
    if mode == pb.LOGITS_NONE:
        assert not reply.HasField("logits")
        expect_rows = 0
    else:
        expect_rows = rows if mode == pb.LOGITS_ALL else seqs
        assert list(reply.logits.shape) == [expect_rows, VOCAB] and reply.logits.dtype == dtype
        assert len(reply.logits.data) == expect_rows * VOCAB * DTYPE_SIZE[dtype]
    if request.top_k:
        assert len(reply.top_k) == (expect_rows or seqs)
        assert all(len(t.token_ids) == request.top_k for t in reply.top_k)


def fuzz(worker: RunningServer, rpc: str, strategy: st.SearchStrategy) -> Counter:
    stub = worker.stub()
    method = getattr(stub, rpc)
    seen: Counter = Counter()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(strategy)
    def one(request: Any) -> None:
        try:
            reply = method(request, timeout=30)
            code = Code.OK
        except grpc.RpcError as exc:
            code, reply = exc.code(), None
            assert code in ALLOWED, f"{code.name} for {request}: {exc.details()}"
            assert exc.details(), f"{code.name} without a message for {request}"
        seen[code.name] += 1
        if reply is not None:
            if rpc == "Forward":
                check_reply(reply, len(request.token_ids), request.batch_size or 1, request)
            else:
                check_reply(reply, len(request.input_tokens), len(request.block_tables), request)

    one()
    return seen


@pytest.mark.parametrize(
    ("rpc", "strategy"),
    [("Forward", forward_requests()), ("ForwardPaged", paged_requests())],
    ids=["Forward", "ForwardPaged"],
)
def test_fuzz(worker: RunningServer, rpc: str, strategy: st.SearchStrategy) -> None:
    stub = worker.stub()
    known = pb.ForwardRequest(model_id="a", token_ids=[3, 1, 4, 1, 5, 9, 2, 6])
    before = stub.Forward(known).logits.data
    seen = fuzz(worker, rpc, strategy)
    print(
        f"fuzz {rpc}: {sum(seen.values())} requests, "
        + ", ".join(f"{k} {v}" for k, v in sorted(seen.items()))
    )
    assert seen["OK"] > 0 and seen["INVALID_ARGUMENT"] > 0  # both sides of the checks were reached
    assert worker.health() == health_pb2.HealthCheckResponse.SERVING
    assert stub.Forward(known).logits.data == before  # stateless: the same answer as before
    assert [m.id for m in stub.ListModels(pb.ListModelsRequest()).models] == ["a"]
