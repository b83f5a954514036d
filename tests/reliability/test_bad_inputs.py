"""Bad inputs, one test per class, through a real server: each call gets its status code (DESIGN.md
table) and a message naming what is wrong and where; the model's caches are exactly as before
(contiguous: SliceKvCache of every layer, and the rows' fill levels; paged: the logits of a read-only
decode over the cached sequences, and the cache tensors compared in-process); and the server still
serves: health is SERVING and a call that continues the cached sequences answers like a stateless
forward over the whole sequences.

Before every test both caches hold data: two 10-token rows in the contiguous cache, and two
sequences (20 tokens in blocks 3 and 7, 5 tokens in block 12) in the paged one. The bad paged calls
are variants of a valid prefill that would overwrite those very blocks, so a call that wrote before
failing would show."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2

from tests.worker.harness import RunningServer, make_settings, start_server
from worker.pb.modelworker.v1 import worker_pb2 as pb

from .common import SMALL_KV, Code, assert_status, logits, rpc_error

VOCAB = 128
POSITIONS = 256  # max_position_embeddings of the tiny Llama
LAYERS = 2
BLOCK = 16
NUM_BLOCKS = 64
MAX_SEQ_LEN = 128
ROW_LEN = 10  # tokens in each contiguous cache row
SEQ0_BLOCKS, SEQ1_BLOCKS = [3, 7], [12]
SEQ0_LEN, SEQ1_LEN = 20, 5


def slots_of(blocks: list[int], start: int, count: int) -> list[int]:
    """Slots of tokens [start, start + count) of a sequence stored in `blocks`."""
    return [blocks[j // BLOCK] * BLOCK + j % BLOCK for j in range(start, start + count)]


@dataclass
class Served:
    running: RunningServer
    rows: list[list[int]]  # 2 × (ROW_LEN + 2) tokens: the cached rows and their continuation
    seqs: list[list[int]]  # the paged sequences' tokens: SEQ0_LEN + 1 and SEQ1_LEN

    @property
    def stub(self) -> Any:
        return self.running.stub()


@pytest.fixture(scope="module")
def served(aio_loop: asyncio.AbstractEventLoop, model_root: Path) -> Iterator[Served]:
    running = start_server(aio_loop, make_settings(model_root))
    running.stub().Load(pb.LoadRequest(model_id="a", model_dir="llama", kv_cache=SMALL_KV))
    rng = random.Random()
    rows = [[rng.randrange(VOCAB) for _ in range(ROW_LEN + 2)] for _ in range(2)]
    seqs = [
        [rng.randrange(VOCAB) for _ in range(SEQ0_LEN + 1)],
        [rng.randrange(VOCAB) for _ in range(SEQ1_LEN)],
    ]
    yield Served(running, rows, seqs)
    running.stop(grace=0.5)


def paged_write(served: Served, **overrides: Any) -> pb.ForwardPagedRequest:
    """A valid prefill of both sequences with other tokens, over the blocks that hold them; the bad
    calls are this with one field broken."""
    tokens = [(t + 1) % VOCAB for t in served.seqs[0][:SEQ0_LEN] + served.seqs[1]]
    fields: dict[str, Any] = dict(
        model_id="a",
        input_tokens=tokens,
        positions=list(range(SEQ0_LEN)) + list(range(SEQ1_LEN)),
        block_tables=[pb.BlockTable(block_ids=SEQ0_BLOCKS), pb.BlockTable(block_ids=SEQ1_BLOCKS)],
        slot_mapping=slots_of(SEQ0_BLOCKS, 0, SEQ0_LEN) + slots_of(SEQ1_BLOCKS, 0, SEQ1_LEN),
        context_lens=[SEQ0_LEN, SEQ1_LEN],
        is_prefill=True,
    )
    fields.update(overrides)
    return pb.ForwardPagedRequest(**fields)


def probe(served: Served) -> pb.ForwardPagedRequest:
    """A decode of each sequence's last cached token with slot -1: it reads the whole context from
    the cache and writes nothing."""
    return pb.ForwardPagedRequest(
        model_id="a",
        input_tokens=[served.seqs[0][SEQ0_LEN - 1], served.seqs[1][SEQ1_LEN - 1]],
        positions=[SEQ0_LEN - 1, SEQ1_LEN - 1],
        block_tables=[pb.BlockTable(block_ids=SEQ0_BLOCKS), pb.BlockTable(block_ids=SEQ1_BLOCKS)],
        slot_mapping=[-1, -1],
        context_lens=[SEQ0_LEN, SEQ1_LEN],
        is_prefill=False,
    )


def fingerprint(served: Served) -> tuple:
    """Everything the caches hold, through the API and in-process."""
    stub = served.stub
    sliced = []
    for layer in range(LAYERS):
        kv = stub.SliceKvCache(pb.SliceKvCacheRequest(model_id="a", layer_idx=layer, length=MAX_SEQ_LEN))
        sliced.append((kv.key.data, kv.value.data))
    probed = stub.ForwardPaged(probe(served)).logits.data
    with served.running.registry.get_model_mut("a") as model:
        tensors = [
            t.clone() for t in (model.paged._k, model.paged._v, *model.contiguous.k, *model.contiguous.v)
        ]
        filled = list(model.contiguous.filled)
    return sliced, probed, tensors, filled


def same(a: tuple, b: tuple) -> bool:
    return a[:2] == b[:2] and a[3] == b[3] and all(torch.equal(x, y) for x, y in zip(a[2], b[2], strict=True))


@pytest.fixture
def primed(served: Served) -> Served:
    """Fill both caches, and check the fingerprint is stable (the probe writes nothing)."""
    stub = served.stub
    stub.ResetCache(pb.ResetCacheRequest(model_id="a"))
    rows = [row[:ROW_LEN] for row in served.rows]
    stub.Forward(pb.ForwardRequest(model_id="a", token_ids=rows[0] + rows[1], batch_size=2, use_cache=True))
    prefill = paged_write(served, input_tokens=served.seqs[0][:SEQ0_LEN] + served.seqs[1])
    stub.ForwardPaged(prefill)
    assert same(fingerprint(served), fingerprint(served))
    return served


def refuse(served: Served, calls: list[tuple[Callable[[Any], Any], Code, list[str]]]) -> None:
    """Each call gets its code and message, and leaves both caches as they were."""
    for call, code, fragments in calls:
        before = fingerprint(served)
        err = rpc_error(lambda: call(served.stub))  # noqa: B023 - called at once
        assert_status(err, code, *fragments)
        assert same(fingerprint(served), before), f"the refused call changed a cache: {err.details()}"
    still_serving(served)
    codes = sorted({code.name for _, code, _ in calls})
    print(f"{len(calls)} bad calls refused ({', '.join(codes)}), caches unchanged, server serving")


def still_serving(served: Served) -> None:
    """Health SERVING, and continuing both caches answers like stateless forwards over the whole
    sequences (an independent path: no cache involved)."""
    stub = served.stub
    assert served.running.health() == health_pb2.HealthCheckResponse.SERVING
    rows = served.rows
    cont = stub.Forward(
        pb.ForwardRequest(
            model_id="a",
            token_ids=rows[0][ROW_LEN:] + rows[1][ROW_LEN:],
            batch_size=2,
            use_cache=True,
            start_pos=ROW_LEN,
            logits_mode=pb.LOGITS_ALL,
        )
    )
    full = stub.Forward(
        pb.ForwardRequest(model_id="a", token_ids=rows[0] + rows[1], batch_size=2, logits_mode=pb.LOGITS_ALL)
    )
    expected = logits(full).view(2, ROW_LEN + 2, VOCAB)[:, ROW_LEN:].reshape(4, VOCAB)
    torch.testing.assert_close(logits(cont), expected, atol=2e-5, rtol=1e-4)
    seq = served.seqs[0]
    decode = stub.ForwardPaged(
        pb.ForwardPagedRequest(
            model_id="a",
            input_tokens=[seq[SEQ0_LEN]],
            positions=[SEQ0_LEN],
            block_tables=[pb.BlockTable(block_ids=SEQ0_BLOCKS)],
            slot_mapping=slots_of(SEQ0_BLOCKS, SEQ0_LEN, 1),
            context_lens=[SEQ0_LEN + 1],
            is_prefill=False,
        )
    )
    whole = stub.Forward(pb.ForwardRequest(model_id="a", token_ids=seq))
    torch.testing.assert_close(logits(decode), logits(whole), atol=2e-5, rtol=1e-4)


def forward(**fields: Any) -> Callable[[Any], Any]:
    request = pb.ForwardRequest(**dict(dict(model_id="a"), **fields))
    return lambda stub: stub.Forward(request)


def paged(served: Served, **overrides: Any) -> Callable[[Any], Any]:
    request = paged_write(served, **overrides)
    return lambda stub: stub.ForwardPaged(request)


INVALID = Code.INVALID_ARGUMENT


def test_the_fingerprint_sees_writes(primed: Served) -> None:
    """The check the bad-input tests rely on is not blind: valid writes to either cache change it."""
    before = fingerprint(primed)
    primed.stub.ForwardPaged(paged_write(primed))
    after_paged = fingerprint(primed)
    assert not same(after_paged, before) and after_paged[0] == before[0]
    tokens = [(t + 1) % VOCAB for t in primed.rows[0][:ROW_LEN]]
    primed.stub.Forward(pb.ForwardRequest(model_id="a", token_ids=tokens, use_cache=True))
    after_dense = fingerprint(primed)
    assert after_dense[0] != after_paged[0]


# -- one test per class ----------------------------------------------------------------------------
def test_empty_token_list(primed: Served) -> None:
    refuse(
        primed,
        [
            (forward(token_ids=[], use_cache=True), INVALID, ["token_ids is empty"]),
            (forward(token_ids=[], batch_size=2), INVALID, ["token_ids is empty"]),
            (
                paged(primed, input_tokens=[], positions=[], slot_mapping=[]),
                INVALID,
                ["input_tokens is empty"],
            ),
        ],
    )


def test_batch_size_that_does_not_divide_the_tokens(primed: Served) -> None:
    tokens = primed.rows[0][:5]
    refuse(
        primed,
        [
            (forward(token_ids=tokens, batch_size=2, use_cache=True), INVALID,
             ["len(token_ids) = 5 is not a multiple of batch_size 2"]),
            (forward(token_ids=tokens[:4], batch_size=3), INVALID, ["len(token_ids) = 4", "batch_size 3"]),
        ],
    )  # fmt: skip


def test_negative_and_out_of_vocabulary_token_ids(primed: Served) -> None:
    row0, row1 = (r[:ROW_LEN] for r in primed.rows)
    over = row1[:3] + [VOCAB] + row1[4:]
    tokens = primed.seqs[0][:SEQ0_LEN] + primed.seqs[1][:2] + [999] + primed.seqs[1][3:]
    refuse(
        primed,
        [
            (forward(token_ids=row0 + over, batch_size=2, use_cache=True), INVALID,
             [f"input_ids[1, 3] = {VOCAB}", f"outside the vocabulary [0, {VOCAB})"]),
            (forward(token_ids=[-1] + row0[1:], use_cache=True), INVALID, ["input_ids[0, 0] = -1"]),
            (forward(token_ids=[1, -(2**31)]), INVALID, [f"input_ids[0, 1] = {-(2**31)}"]),
            (paged(primed, input_tokens=tokens), INVALID,
             ["sequence 1", f"input_tokens[{SEQ0_LEN + 2}] = 999", "token 2 of the sequence", "vocabulary"]),
        ],
    )  # fmt: skip


def test_positions_past_the_limit(primed: Served) -> None:
    row0 = primed.rows[0][:ROW_LEN]
    positions = list(range(SEQ0_LEN)) + [0, 1, 2, POSITIONS, 4]
    refuse(
        primed,
        [
            (forward(token_ids=row0[:2], positions=[0, POSITIONS], use_cache=True), INVALID,
             [f"positions[0, 1] = {POSITIONS}", f"outside [0, {POSITIONS})"]),
            (forward(token_ids=row0[:2], start_pos=POSITIONS - 1), INVALID, [f"positions[0, 1] = {POSITIONS}"]),
            (forward(token_ids=row0[:2], positions=[-3, 0]), INVALID, ["positions[0, 0] = -3"]),
            (paged(primed, positions=positions), INVALID,
             ["sequence 1", f"positions[{SEQ0_LEN + 3}] = {POSITIONS}", "token 3 of the sequence",
              f"max_position_embeddings {POSITIONS}"]),
        ],
    )  # fmt: skip


def test_start_pos_beyond_the_cache(primed: Served) -> None:
    two = primed.rows[0][:2]
    refuse(
        primed,
        [
            (forward(token_ids=two, use_cache=True, start_pos=MAX_SEQ_LEN - 1), INVALID,
             [f"start_pos {MAX_SEQ_LEN - 1} + seq_len 2", f"max_seq_len {MAX_SEQ_LEN}"]),
            (forward(token_ids=two, use_cache=True, start_pos=2**32 - 1), INVALID, [f"start_pos {2**32 - 1}"]),
            (forward(token_ids=two, use_cache=True, start_pos=ROW_LEN + 1), INVALID,
             [f"start_pos {ROW_LEN + 1} leaves a gap in cache row 0", f"holds {ROW_LEN} tokens"]),
            (lambda s: s.SliceKvCache(pb.SliceKvCacheRequest(model_id="a", start_pos=120, length=16)), INVALID,
             ["start_pos 120 + length 16", f"max_seq_len {MAX_SEQ_LEN}"]),
        ],
    )  # fmt: skip


def test_paged_mismatched_lengths(primed: Served) -> None:
    n = SEQ0_LEN + SEQ1_LEN
    write = paged_write(primed)
    refuse(
        primed,
        [
            (paged(primed, positions=list(write.positions)[:-1]), INVALID,
             [f"len(positions) = {n - 1} must equal len(input_tokens) = {n}"]),
            (paged(primed, slot_mapping=list(write.slot_mapping) + [200]), INVALID,
             [f"len(slot_mapping) = {n + 1}"]),
            (paged(primed, context_lens=[SEQ0_LEN]), INVALID,
             ["len(context_lens) = 1 must equal len(block_tables) = 2"]),
            (paged(primed, query_lens=[SEQ0_LEN]), INVALID, ["len(query_lens) = 1"]),
            (paged(primed, query_lens=[SEQ0_LEN, SEQ1_LEN - 1]), INVALID,
             [f"add up to {n - 1} tokens but input_tokens has {n}"]),
        ],
    )  # fmt: skip


def test_paged_block_ids_out_of_range(primed: Served) -> None:
    def tables(first: list[int]) -> list[pb.BlockTable]:
        return [pb.BlockTable(block_ids=first), pb.BlockTable(block_ids=SEQ1_BLOCKS)]

    refuse(
        primed,
        [
            (paged(primed, block_tables=tables([3, NUM_BLOCKS])), INVALID,
             [f"sequence 0: block_tables[0][1] = {NUM_BLOCKS} is outside [0, {NUM_BLOCKS})"]),
            (paged(primed, block_tables=tables([-1, 7])), INVALID, ["block_tables[0][0] = -1"]),
            (paged(primed, block_tables=tables([3, 2**31 - 1])), INVALID, [f"= {2**31 - 1} is outside"]),
        ],
    )  # fmt: skip


def test_paged_slots_out_of_range(primed: Served) -> None:
    slots = list(paged_write(primed).slot_mapping)
    num_slots = NUM_BLOCKS * BLOCK

    def with_slot(i: int, value: int) -> list[int]:
        return slots[:i] + [value] + slots[i + 1 :]

    refuse(
        primed,
        [
            (paged(primed, slot_mapping=with_slot(SEQ0_LEN + 1, num_slots)), INVALID,
             ["sequence 1", f"slot_mapping[{SEQ0_LEN + 1}] = {num_slots}", f"outside [-1, {num_slots})"]),
            (paged(primed, slot_mapping=with_slot(4, -2)), INVALID, ["sequence 0: slot_mapping[4] = -2"]),
            (paged(primed, slot_mapping=with_slot(4, 2**62)), INVALID, [f"slot_mapping[4] = {2**62}"]),
            # In range, but not where the block table puts the token: it would overwrite block 0.
            (paged(primed, slot_mapping=with_slot(17, 1)), INVALID,
             ["sequence 0: slot_mapping[17] = 1", "token 17 of the sequence belongs in block 7 at offset 1"]),
        ],
    )  # fmt: skip


def test_paged_duplicate_slots(primed: Served) -> None:
    # Both sequences share block 3 (a shared prefix is legal) but write the same slot in one call.
    shared = [pb.BlockTable(block_ids=SEQ0_BLOCKS), pb.BlockTable(block_ids=[3])]
    slots = slots_of(SEQ0_BLOCKS, 0, SEQ0_LEN) + slots_of([3], 0, SEQ1_LEN)
    refuse(
        primed,
        [
            (paged(primed, block_tables=shared, slot_mapping=slots), INVALID,
             [f"sequence 1: slot_mapping[{SEQ0_LEN}] = 48 repeats the slot of slot_mapping[0] (sequence 0)"]),
            (paged(primed, block_tables=[pb.BlockTable(block_ids=[3, 3]), pb.BlockTable(block_ids=SEQ1_BLOCKS)]),
             INVALID, ["sequence 0: block_tables[0] lists block 3 more than once"]),
        ],
    )  # fmt: skip


def test_paged_context_len_beyond_the_blocks(primed: Served) -> None:
    one_block = [pb.BlockTable(block_ids=[3]), pb.BlockTable(block_ids=SEQ1_BLOCKS)]
    refuse(
        primed,
        [
            (paged(primed, block_tables=one_block), INVALID,
             [f"sequence 0: context_len {SEQ0_LEN} exceeds its 1 blocks of {BLOCK} tokens ({BLOCK})"]),
            # Longer than the whole cache: KV capacity, RESOURCE_EXHAUSTED.
            (paged(primed, context_lens=[SEQ0_LEN, 5000], query_lens=[SEQ0_LEN, SEQ1_LEN]),
             Code.RESOURCE_EXHAUSTED,
             ["sequence 1: context_len 5000 exceeds the whole paged cache", f"{NUM_BLOCKS} blocks"]),
        ],
    )  # fmt: skip


def test_paged_query_len_beyond_context_len(primed: Served) -> None:
    n = SEQ0_LEN + SEQ1_LEN
    refuse(
        primed,
        [
            (paged(primed, context_lens=[SEQ0_LEN - 1, SEQ1_LEN], query_lens=[SEQ0_LEN, SEQ1_LEN]), INVALID,
             [f"sequence 0: query_len {SEQ0_LEN} is outside [1, context_len {SEQ0_LEN - 1}]"]),
            (paged(primed, query_lens=[n, 0]), INVALID, ["query_lens[1] = 0 must be >= 1"]),
            (paged(primed, is_prefill=False, query_lens=[SEQ0_LEN, SEQ1_LEN]), INVALID,
             [f"sequence 0: query_len {SEQ0_LEN} in a decode call"]),
        ],
    )  # fmt: skip


def test_unknown_enum_values(primed: Served) -> None:
    row = primed.rows[0][:ROW_LEN]
    refuse(
        primed,
        [
            (forward(token_ids=row, use_cache=True, logits_dtype=17), INVALID, ["logits_dtype 17 is not a DType"]),
            (forward(token_ids=row, logits_dtype=-5), INVALID, ["logits_dtype -5"]),
            (forward(token_ids=row, use_cache=True, logits_dtype=pb.INT32), INVALID,
             ["logits_dtype INT32 is not a logits type"]),
            (forward(token_ids=row, use_cache=True, logits_mode=9), INVALID, ["logits_mode 9 is not a LogitsMode"]),
            (paged(primed, logits_dtype=99), INVALID, ["logits_dtype 99"]),
            (paged(primed, logits_mode=-1), INVALID, ["logits_mode -1"]),
        ],
    )  # fmt: skip


def test_layer_index_out_of_range(primed: Served) -> None:
    def slice_at(layer: int) -> Callable[[Any], Any]:
        return lambda s: s.SliceKvCache(pb.SliceKvCacheRequest(model_id="a", layer_idx=layer, length=4))

    refuse(
        primed,
        [
            (slice_at(LAYERS), INVALID, [f"layer_idx {LAYERS} is outside [0, {LAYERS})"]),
            (slice_at(2**32 - 1), INVALID, [f"layer_idx {2**32 - 1}"]),
        ],
    )


def test_lengths_and_batch_sizes_past_what_the_model_holds(primed: Served) -> None:
    """Issue 21 item 11: sizes far past the model's limits are INVALID_ARGUMENT, not a
    RESOURCE_EXHAUSTED from the size arithmetic."""
    huge = 2**32 - 1
    slice_huge = pb.SliceKvCacheRequest(model_id="a", layer_idx=0, length=huge)
    slice_far = pb.SliceKvCacheRequest(model_id="a", layer_idx=0, start_pos=huge, length=1)
    refuse(
        primed,
        [
            (lambda s: s.SliceKvCache(slice_huge), INVALID, [f"length {huge}", f"max_seq_len {MAX_SEQ_LEN}"]),
            (
                lambda s: s.SliceKvCache(slice_far),
                INVALID,
                [f"start_pos {huge}", f"max_seq_len {MAX_SEQ_LEN}"],
            ),
            (forward(token_ids=primed.rows[0][:4], batch_size=huge), INVALID, [f"batch_size {huge} exceeds"]),
        ],
    )


def test_block_table_longer_than_the_cache(primed: Served) -> None:
    """Issue 21 item 6: a block table of a million ids (4 MB) for a 64-block cache is refused from
    its length, before any id is converted."""
    long_table = [pb.BlockTable(block_ids=list(range(1_000_000))), pb.BlockTable(block_ids=SEQ1_BLOCKS)]
    refuse(
        primed,
        [
            (
                paged(primed, block_tables=long_table),
                INVALID,
                ["block_tables[0] has 1000000 block ids", f"{NUM_BLOCKS} blocks"],
            )
        ],
    )


BAD_IDS = ["", "x" * 129, "../a", "a/b", "a\\b", "/abs", "..", ".", "a b", "a\x00b", "mödel"]


def test_bad_model_ids(primed: Served) -> None:
    calls: list[tuple[Callable[[Any], Any], Code, list[str]]] = []
    for bad in BAD_IDS:
        what = "is reserved" if bad in (".", "..") else "must be 1-128 characters of [A-Za-z0-9._-]"
        for call in (
            lambda s, b=bad: s.Load(pb.LoadRequest(model_id=b, model_dir="llama", kv_cache=SMALL_KV)),
            lambda s, b=bad: s.Forward(pb.ForwardRequest(model_id=b, token_ids=[1])),
            lambda s, b=bad: s.ForwardPaged(paged_write(primed, model_id=b)),
            lambda s, b=bad: s.Unload(pb.UnloadRequest(model_id=b)),
            lambda s, b=bad: s.ResetCache(pb.ResetCacheRequest(model_id=b)),
            lambda s, b=bad: s.SliceKvCache(pb.SliceKvCacheRequest(model_id=b, length=1)),
        ):
            calls.append((call, INVALID, [f"model_id {bad!r} {what}"]))
    refuse(primed, calls)
    assert [m.id for m in primed.stub.ListModels(pb.ListModelsRequest()).models] == ["a"]
    # The longest valid id is accepted.
    longest = "x" * 128
    primed.stub.Load(pb.LoadRequest(model_id=longest, model_dir="llama", kv_cache=SMALL_KV))
    primed.stub.Unload(pb.UnloadRequest(model_id=longest))


def test_every_call_kept_the_server_serving(served: Served) -> None:
    """After all the refused calls above: nothing crashed, nothing is left locked."""
    assert served.running.health("modelworker.v1.ModelWorker") == health_pb2.HealthCheckResponse.SERVING

    async def held() -> list[str]:
        return [i for i, lock in served.running.server.servicer._locks.items() if lock.locked()]

    assert served.running.run(held()) == []
    with pytest.raises(grpc.RpcError) as err:
        served.stub.Forward(pb.ForwardRequest(model_id="a", token_ids=[VOCAB]))
    assert err.value.code() == INVALID
