"""Issue 21 item 1: a ForwardPaged call's working memory is bounded and estimated before it runs.

A tiny model with a 2048-block cache (32768 tokens of context): a decode of 64 sequences each over
the whole cache (the 1 MB request that grew RSS by +526 MiB when the backend gathered every
sequence's keys at once) stays within 256 MiB of peak RSS growth and answers the same logits for
every sequence; a call whose estimate exceeds `--max-call-bytes`, or what `--memory-budget-bytes`
leaves after the loaded models, is RESOURCE_EXHAUSTED before anything runs (the cache unchanged, the
server serving). Peak RSS is the process's high-water mark, reset just before the call
(/proc/self/clear_refs), so earlier tests do not count."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from grpc_health.v1 import health_pb2

from architectures.backends.torch_backend import attention_working_bytes
from tests.tiny_models import make_tiny_model_dir
from tests.worker.harness import RunningServer, make_settings, start_server
from worker.pb.modelworker.v1 import worker_pb2 as pb

from .common import Code, MiB, assert_status, logits, rpc_error

BLOCK, BLOCKS = 16, 2048
CONTEXT = BLOCK * BLOCKS  # 32768
LONG_KV = pb.KvCacheConfig(block_size=BLOCK, num_blocks=BLOCKS, max_seq_len=16, max_batch_size=1)
# The goal of the issue: no accepted call grows RSS by more than max(256 MiB, 2 × its logits); the
# logits here are a few KiB. Before the fix this call took +526 MiB.
RSS_GROWTH_BOUND = 256 * MiB


def _status_kib(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


@pytest.fixture(scope="module")
def long_root(tmp_path_factory: pytest.TempPathFactory, weights_seed: int) -> Path:
    root = tmp_path_factory.mktemp("long-context")
    make_tiny_model_dir(root / "long", "llama", seed=weights_seed + 21, max_position_embeddings=CONTEXT)
    return root


def _serve(loop: asyncio.AbstractEventLoop, root: Path, **settings: object) -> RunningServer:
    running = start_server(loop, make_settings(root, **settings))
    running.stub().Load(pb.LoadRequest(model_id="long", model_dir="long", kv_cache=LONG_KV))
    return running


@pytest.fixture(scope="module")
def served(aio_loop: asyncio.AbstractEventLoop, long_root: Path) -> Iterator[RunningServer]:
    running = _serve(aio_loop, long_root)
    yield running
    running.stop(grace=0.5)


def _prefill(tokens: int, first_block: int = 0) -> pb.ForwardPagedRequest:
    blocks = list(range(first_block, first_block + -(-tokens // BLOCK)))
    return pb.ForwardPagedRequest(
        model_id="long",
        input_tokens=[(7 * i) % 128 for i in range(tokens)],
        positions=list(range(tokens)),
        block_tables=[pb.BlockTable(block_ids=blocks)],
        slot_mapping=[blocks[i // BLOCK] * BLOCK + i % BLOCK for i in range(tokens)],
        context_lens=[tokens],
        is_prefill=True,
    )


def _whole_cache_decode(seqs: int) -> pb.ForwardPagedRequest:
    """Every sequence reads the whole cache (blocks 0..2047, context 32768) and writes nothing."""
    table = pb.BlockTable(block_ids=list(range(BLOCKS)))
    return pb.ForwardPagedRequest(
        model_id="long",
        input_tokens=[3] * seqs,
        positions=[CONTEXT - 1] * seqs,
        block_tables=[table] * seqs,
        slot_mapping=[-1] * seqs,
        context_lens=[CONTEXT] * seqs,
        is_prefill=False,
    )


def _probe(running: RunningServer) -> bytes:
    return running.stub().ForwardPaged(_whole_cache_decode(1)).logits.data


def test_whole_cache_decode_of_64_sequences_stays_bounded(served: RunningServer) -> None:
    stub = served.stub()
    stub.ForwardPaged(_prefill(64))  # some real keys in blocks 0-3; the rest of the cache is zeros
    rss_before = _status_kib("VmRSS") * 1024
    _reset_peak()
    started = time.perf_counter()
    reply = stub.ForwardPaged(_whole_cache_decode(64))
    seconds = time.perf_counter() - started
    peak = _status_kib("VmHWM") * 1024
    rss_after = _status_kib("VmRSS") * 1024
    rows = logits(reply)
    print(
        f"64 × 32768-token decode: {seconds:.2f} s, RSS {rss_before / MiB:.0f} → peak {peak / MiB:.0f} "
        f"→ {rss_after / MiB:.0f} MiB"
    )
    assert rows.shape == (64, 128)
    # every sequence reads the same keys: grouped and chunked attention must agree on all of them
    torch.testing.assert_close(rows, rows[:1].expand(64, -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        rows[:1], logits(stub.ForwardPaged(_whole_cache_decode(1))), atol=1e-5, rtol=1e-5
    )
    assert peak - rss_before <= RSS_GROWTH_BOUND, f"peak RSS grew by {(peak - rss_before) / MiB:.0f} MiB"
    assert served.health() == health_pb2.HealthCheckResponse.SERVING


def test_prefill_after_a_long_cached_prefix_stays_bounded(served: RunningServer) -> None:
    """512 new tokens after 32256 cached ones (context 32768). The issue's 4096 tokens took +5.9 GiB
    before the fix (+48 MiB after, but 15 s on one core: too slow for the suite); 512 took +0.8 GiB."""
    stub = served.stub()
    new, ctx = 512, CONTEXT
    first = ctx - new
    blocks = list(range(BLOCKS))
    request = pb.ForwardPagedRequest(
        model_id="long",
        input_tokens=[(5 * i) % 128 for i in range(new)],
        positions=list(range(first, ctx)),
        block_tables=[pb.BlockTable(block_ids=blocks)],
        slot_mapping=[-1] * new,
        context_lens=[ctx],
        query_lens=[new],
        is_prefill=True,
    )
    rss_before = _status_kib("VmRSS") * 1024
    _reset_peak()
    started = time.perf_counter()
    reply = stub.ForwardPaged(request)
    seconds = time.perf_counter() - started
    peak = _status_kib("VmHWM") * 1024
    print(
        f"{new}-token prefill at context 32768: {seconds:.2f} s, RSS {rss_before / MiB:.0f} → peak {peak / MiB:.0f} MiB"
    )
    assert len(reply.next_token_ids) == 1
    assert peak - rss_before <= RSS_GROWTH_BOUND, f"peak RSS grew by {(peak - rss_before) / MiB:.0f} MiB"


def test_call_over_the_per_call_cap_is_refused(aio_loop: asyncio.AbstractEventLoop, long_root: Path) -> None:
    # The cap leaves 4 MiB over the attention bound: a decode fits, a 4096-token prefill does not.
    running = _serve(aio_loop, long_root, max_call_bytes=attention_working_bytes() + 4 * MiB)
    try:
        stub = running.stub()
        stub.ForwardPaged(_prefill(32))
        before = _probe(running)
        started = time.perf_counter()
        err = rpc_error(lambda: stub.ForwardPaged(_prefill(4096, first_block=8)))
        print(f"over --max-call-bytes: {err.code().name} in {time.perf_counter() - started:.3f} s")
        assert_status(err, Code.RESOURCE_EXHAUSTED, "working memory", "--max-call-bytes")
        assert _probe(running) == before  # nothing was written (blocks 8+ are not read by the probe,
        with running.registry.get_model_mut("long") as model:  # so check them in-process too)
            assert not model.paged._k[:, 8:].any()
        assert running.health() == health_pb2.HealthCheckResponse.SERVING
    finally:
        running.stop(grace=0.5)


def test_call_over_the_memory_budget_is_refused(aio_loop: asyncio.AbstractEventLoop, long_root: Path) -> None:
    running = _serve(aio_loop, long_root)
    held = running.stub().ListModels(pb.ListModelsRequest()).models[0]
    running.stop(grace=0.5)
    # A budget that fits the model and a decode's working memory, not a 4096-token prefill.
    budget = held.weight_bytes + held.kv_cache_bytes + attention_working_bytes() + 4 * MiB
    running = _serve(aio_loop, long_root, memory_budget_bytes=budget)
    try:
        stub = running.stub()
        stub.ForwardPaged(_prefill(32))
        before = _probe(running)
        err = rpc_error(lambda: stub.ForwardPaged(_prefill(4096, first_block=8)))
        assert_status(err, Code.RESOURCE_EXHAUSTED, "working memory", "memory budget")
        assert _probe(running) == before
        assert running.health() == health_pb2.HealthCheckResponse.SERVING
    finally:
        running.stop(grace=0.5)


def test_rotary_tables_are_not_built_for_every_position(
    aio_loop: asyncio.AbstractEventLoop, tmp_path: Path, weights_seed: int
) -> None:
    """Issue 21 item 8: max_position_embeddings 2,000,000 cost +531 MiB peak at Load (a cos/sin table
    over every position, not counted anywhere), and dynamic RoPE +557 MiB for one token at position
    2e6. cos/sin are now computed for the call's positions only."""
    positions = 2_000_000
    make_tiny_model_dir(tmp_path / "static", "llama", seed=weights_seed, max_position_embeddings=positions)
    make_tiny_model_dir(
        tmp_path / "dynamic",
        "llama",
        seed=weights_seed,
        max_position_embeddings=positions,
        rope_scaling={"rope_type": "dynamic", "factor": 2.0},
    )
    running = start_server(aio_loop, make_settings(tmp_path))
    small = pb.KvCacheConfig(block_size=16, num_blocks=4, max_seq_len=16, max_batch_size=1)
    try:
        stub = running.stub()
        stub.Load(pb.LoadRequest(model_id="warm", model_dir="static", kv_cache=small))  # one-time costs
        stub.Unload(pb.UnloadRequest(model_id="warm"))
        for name in ("static", "dynamic"):
            rss_before = _status_kib("VmRSS") * 1024
            _reset_peak()
            stub.Load(pb.LoadRequest(model_id=name, model_dir=name, kv_cache=small))
            far = stub.Forward(pb.ForwardRequest(model_id=name, token_ids=[5], positions=[positions - 1]))
            peak = _status_kib("VmHWM") * 1024
            print(
                f"{name} RoPE, {positions} positions: Load + Forward at the last one, peak +{(peak - rss_before) / MiB:.0f} MiB"
            )
            assert len(far.next_token_ids) == 1
            assert peak - rss_before <= 64 * MiB
        assert running.health() == health_pb2.HealthCheckResponse.SERVING
    finally:
        running.stop(grace=0.5)
