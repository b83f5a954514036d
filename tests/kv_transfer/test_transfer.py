"""KV block transfer between two serve processes: prefill on A, move the blocks, decode on B, bit for
bit what A alone computes; swapping out and back in; every refused import leaves the destination
cache as it was (read back by exporting the same blocks again) and the worker serving."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from tests.observability.scrape import scrape
from worker.client import (
    AsyncModelWorkerClient,
    FailedPreconditionError,
    InvalidArgumentError,
    KvBlocks,
    KvCacheConfig,
    KvLayout,
    ModelWorkerClient,
    NotFoundError,
)
from worker.pb.modelworker.v1 import worker_pb2 as pb
from worker.pb.modelworker.v1 import worker_pb2_grpc as pb_grpc

from .conftest import A_MAX_MESSAGE_BYTES, BLOCK, NUM_BLOCKS, Worker

VOCAB = 128
PROMPT_LEN = 13  # 3 full blocks of 4 and one token of a fourth
DECODE = 32


def slots(blocks: list[int], start: int, end: int) -> list[int]:
    return [blocks[i // BLOCK] * BLOCK + i % BLOCK for i in range(start, end)]


def prefill(client: ModelWorkerClient, model: str, prompt: list[int], blocks: list[int]) -> int:
    n = len(prompt)
    out = client.forward_paged(
        model, prompt, list(range(n)), [blocks], slots(blocks, 0, n), [n], is_prefill=True
    )
    return out.next_token_ids[0]


def decode(
    client: ModelWorkerClient, model: str, first: int, blocks: list[int], steps: int = DECODE
) -> tuple[list[int], np.ndarray]:
    """`steps` greedy decode steps after a PROMPT_LEN-token prefill whose next token was `first`:
    the tokens and each step's float32 logits [steps, vocab]."""
    tokens, logits = [first], []
    for s in range(steps):
        pos = PROMPT_LEN + s
        out = client.forward_paged(
            model, [tokens[-1]], [pos], [blocks], slots(blocks, pos, pos + 1), [pos + 1], is_prefill=False
        )
        tokens.append(out.next_token_ids[0])
        logits.append(out.logits[0])
    return tokens[1:], np.stack(logits)


def random_prompt(rng: random.Random) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(PROMPT_LEN)]


def same_blocks(x: KvBlocks, y: KvBlocks) -> bool:
    return x.layout == y.layout and np.array_equal(x.key, y.key) and np.array_equal(x.value, y.value)


@pytest.fixture(scope="module")
def rng() -> random.Random:
    seed = random.randrange(2**31)
    print(f"prompt seed {seed}")
    return random.Random(seed)


@pytest.mark.parametrize("model, dtype", [("f32", "float32"), ("b16", "bfloat16")])
def test_prefill_on_a_decode_on_b_is_bit_identical_to_a_alone(
    workers: tuple[Worker, Worker], rng: random.Random, model: str, dtype: str
) -> None:
    a, b = workers[0].client, workers[1].client
    a_blocks = list(range(12))
    b_blocks = rng.sample(range(NUM_BLOCKS), 12)  # other ids, in another order
    prompt = random_prompt(rng)
    first = prefill(a, model, prompt, a_blocks[:4])
    kv = a.export_kv_blocks(model, a_blocks[:4])
    assert kv.layout == KvLayout(2, BLOCK, 2, 16, dtype)
    assert kv.key.shape == (2, 4, BLOCK, 2, 16)
    assert np.abs(kv.key.view(np.float32 if dtype == "float32" else np.int16)).sum() > 0
    want_tokens, want_logits = decode(a, model, first, a_blocks)

    result = b.import_kv_blocks(model, b_blocks[:4], kv)
    assert (result.blocks, result.bytes) == (4, kv.nbytes)
    assert same_blocks(b.export_kv_blocks(model, b_blocks[:4]), kv)
    tokens, logits = decode(b, model, first, b_blocks)
    assert tokens == want_tokens
    assert logits.dtype == np.float32 and np.array_equal(logits, want_logits)


@pytest.mark.parametrize("model", ["f32", "b16"])
def test_swap_out_overwrite_swap_in_decodes_as_if_never_swapped(
    workers: tuple[Worker, Worker], rng: random.Random, model: str
) -> None:
    a = workers[0].client
    blocks = list(range(12, 24))
    prompt, other = random_prompt(rng), random_prompt(rng)
    first = prefill(a, model, prompt, blocks[:4])
    want_tokens, want_logits = decode(a, model, first, blocks)

    prefill(a, model, prompt, blocks[:4])
    saved = a.export_kv_blocks(model, blocks[:4])  # swap out
    prefill(a, model, other, blocks[:4])  # the blocks now hold another sequence
    assert not same_blocks(a.export_kv_blocks(model, blocks[:4]), saved)
    back = rng.sample(range(NUM_BLOCKS), 12)
    a.import_kv_blocks(model, back[:4], saved)  # swap in, wherever blocks are free
    tokens, logits = decode(a, model, first, back)
    assert tokens == want_tokens
    assert np.array_equal(logits, want_logits)


# -- export chunking -----------------------------------------------------------------------------
def test_export_splits_by_blocks_under_the_message_cap_and_a_raw_relay_imports(
    workers: tuple[Worker, Worker], rng: random.Random
) -> None:
    """One layer of 16 blocks of 32 tokens is 128 KiB: A (cap 64 KiB) sends runs of blocks. Relaying
    its chunks unchanged (plus model and destinations on the first) into B stores the same bytes."""
    a, b = workers[0], workers[1]
    kv = KvCacheConfig(block_size=32, num_blocks=16, max_seq_len=64)
    for w in (a, b):
        w.client.load("wide", "llama", dtype="float32", kv_cache=kv)
    prompt = [rng.randrange(VOCAB) for _ in range(60)]
    table = [3, 7]
    a.client.forward_paged(
        "wide", prompt, list(range(60)), [table], [table[i // 32] * 32 + i % 32 for i in range(60)], [60],
        is_prefill=True,
    )  # fmt: skip
    ids = list(range(16))
    channel = grpc.insecure_channel(
        a.target, options=[("grpc.max_receive_message_length", A_MAX_MESSAGE_BYTES)]
    )
    chunks = list(
        pb_grpc.ModelWorkerStub(channel).ExportKvBlocks(
            pb.ExportKvBlocksRequest(model_id="wide", block_ids=ids)
        )
    )
    channel.close()
    assert len(chunks) > 2
    assert chunks[0].HasField("layout") and not any(c.HasField("layout") for c in chunks[1:])
    seen = np.zeros((2, 16), dtype=int)
    for c in chunks:
        assert c.ByteSize() <= A_MAX_MESSAGE_BYTES
        assert c.layer_end - c.layer_start == 1  # one layer at a time: a layer of every block is too big
        seen[c.layer_start, list(c.block_ids)] += 1
    assert (seen == 1).all()

    dst = rng.sample(range(16), 16)
    first = pb.KvBlocksChunk()
    first.CopyFrom(chunks[0])
    first.model_id = "wide"
    first.dst_block_ids.extend(dst)
    reply = b.client._stub.ImportKvBlocks(iter([first, *chunks[1:]]), timeout=30)
    assert reply.blocks == 16
    got, sent = b.client.export_kv_blocks("wide", dst), a.client.export_kv_blocks("wide", ids)
    assert same_blocks(got, sent)
    assert reply.bytes == sent.nbytes


def test_async_client_round_trip(workers: tuple[Worker, Worker], rng: random.Random) -> None:
    a, b = workers

    async def go() -> tuple[KvBlocks, KvBlocks]:
        async with (
            AsyncModelWorkerClient(a.target, timeout=30) as ca,
            AsyncModelWorkerClient(b.target, timeout=30) as cb,
        ):
            kv = await ca.export_kv_blocks("f32", [5, 2])
            result = await cb.import_kv_blocks("f32", [20, 21], kv, chunk_bytes=1024)
            assert (result.blocks, result.bytes) == (2, kv.nbytes)
            return kv, await cb.export_kv_blocks("f32", [20, 21])

    sent, got = asyncio.run(go())
    assert same_blocks(sent, got)

    async def relay() -> KvBlocks:
        async with (
            AsyncModelWorkerClient(a.target, timeout=30) as ca,
            AsyncModelWorkerClient(b.target, timeout=30) as cb,
        ):
            result = await ca.copy_kv_blocks("f32", [5, 2], cb, "f32", [22, 23])
            assert (result.blocks, result.bytes) == (2, sent.nbytes)
            return await cb.export_kv_blocks("f32", [22, 23])

    assert same_blocks(asyncio.run(relay()), sent)


def test_copy_relays_chunks_worker_to_worker_and_reports_the_failing_side(
    workers: tuple[Worker, Worker], rng: random.Random
) -> None:
    a, b = workers[0].client, workers[1].client
    prefill(a, "f32", random_prompt(rng), [14, 15, 16, 17])
    result = a.copy_kv_blocks("f32", [14, 15, 16, 17], b, "f32", [19, 18, 17, 16])
    sent = a.export_kv_blocks("f32", [14, 15, 16, 17])
    assert (result.blocks, result.bytes) == (4, sent.nbytes)
    assert same_blocks(b.export_kv_blocks("f32", [19, 18, 17, 16]), sent)

    before = b.export_kv_blocks("f32", [19, 18, 17, 16])
    with pytest.raises(InvalidArgumentError) as info:  # the export's error, not the import's
        a.copy_kv_blocks("f32", [14, 99], b, "f32", [19, 18])
    assert info.value.method == "ExportKvBlocks" and "block_ids[1] = 99 is outside" in info.value.details
    with pytest.raises(FailedPreconditionError) as refused:  # the import's error
        a.copy_kv_blocks("f32", [14, 15], b, "b16", [0, 1])
    assert refused.value.method == "ImportKvBlocks" and "dtype FLOAT32 vs BFLOAT16" in refused.value.details
    assert same_blocks(b.export_kv_blocks("f32", [19, 18, 17, 16]), before)


# -- refused imports ------------------------------------------------------------------------------
DST = [0, 1, 2, 3]


@pytest.fixture(scope="module")
def filled_b(workers: tuple[Worker, Worker]) -> Worker:
    """B's f32 blocks 0-5 hold a prefilled sequence, so that "unchanged" is not "still zero"."""
    b = workers[1]
    prompt = list(range(5, 5 + 22))
    table = [0, 1, 2, 3, 4, 5]
    b.client.forward_paged(
        "f32", prompt, list(range(22)), [table], slots(table, 0, 22), [22], is_prefill=True
    )
    return b


@pytest.fixture(scope="module")
def exported(workers: tuple[Worker, Worker]) -> KvBlocks:
    a = workers[0].client
    prefill(a, "f32", list(range(40, 40 + PROMPT_LEN)), [8, 9, 10, 11])
    return a.export_kv_blocks("f32", [8, 9, 10, 11])


def still_serving(client: ModelWorkerClient) -> None:
    assert client.forward("f32", [1, 2, 3]).next_token_ids


@pytest.mark.parametrize(
    "target, blocks, expected",
    [
        ("bs8", [0, 1], "block_size 4 vs 8"),
        ("b16", DST, "dtype FLOAT32 vs BFLOAT16"),
        ("kv4", DST, "num_kv_heads 2 vs 4"),
    ],
)
def test_import_of_another_layout_is_failed_precondition(
    workers: tuple[Worker, Worker], exported: KvBlocks, target: str, blocks: list[int], expected: str
) -> None:
    b = workers[1].client
    kv = (
        exported
        if len(blocks) == 4
        else KvBlocks(exported.layout, exported.block_ids[:2], exported.key[:, :2], exported.value[:, :2])
    )
    before = b.export_kv_blocks(target, blocks)
    with pytest.raises(FailedPreconditionError) as info:
        b.import_kv_blocks(target, blocks, kv)
    assert expected in info.value.details and repr(target) in info.value.details
    assert same_blocks(b.export_kv_blocks(target, blocks), before)
    still_serving(b)


@pytest.mark.parametrize(
    "dst, expected",
    [
        ([0, 1, 2, NUM_BLOCKS], f"dst_block_ids[3] = {NUM_BLOCKS} is outside [0, {NUM_BLOCKS})"),
        ([0, 1, -1, 3], "dst_block_ids[2] = -1 is outside"),
        ([0, 1, 1, 3], "dst_block_ids[2] = 1 lists block 1 more than once"),
    ],
)
def test_import_into_bad_block_ids_is_invalid_argument(
    filled_b: Worker, exported: KvBlocks, dst: list[int], expected: str
) -> None:
    b = filled_b.client
    before = b.export_kv_blocks("f32", DST)
    with pytest.raises(InvalidArgumentError) as info:
        b.import_kv_blocks("f32", dst, exported)
    assert expected in info.value.details
    assert same_blocks(b.export_kv_blocks("f32", DST), before)
    still_serving(b)


def raw_chunks(kv: KvBlocks, dst: list[int]) -> list[pb.KvBlocksChunk]:
    """The import stream for `kv` as two chunks, one per layer (the first names model and dst)."""
    out = []
    for layer in range(kv.layout.num_layers):
        c = pb.KvBlocksChunk(layer_start=layer, layer_end=layer + 1, block_ids=kv.block_ids)
        for msg, array in ((c.key, kv.key), (c.value, kv.value)):
            msg.dtype = pb.FLOAT32
            msg.shape.extend(array[layer : layer + 1].shape)
            msg.data = np.ascontiguousarray(array[layer : layer + 1]).tobytes()
        out.append(c)
    out[0].model_id = "f32"
    out[0].dst_block_ids.extend(dst)
    out[0].layout.CopyFrom(
        pb.KvLayout(num_layers=2, block_size=BLOCK, num_kv_heads=2, head_dim=16, dtype=pb.FLOAT32)
    )
    return out


def _fewer_dst(c: list[pb.KvBlocksChunk]) -> None:
    del c[0].dst_block_ids[-1]


def _more_dst(c: list[pb.KvBlocksChunk]) -> None:
    c[0].dst_block_ids.append(7)


def _bad_shape(c: list[pb.KvBlocksChunk]) -> None:
    c[1].value.shape[:] = [1, 4, BLOCK, 4, 8]  # the same element count, another shape


def _short_data(c: list[pb.KvBlocksChunk]) -> None:
    c[1].key.data = c[1].key.data[:-4]


def _layer_twice(c: list[pb.KvBlocksChunk]) -> None:
    c[1].layer_start, c[1].layer_end = 0, 1


def _ends_early(c: list[pb.KvBlocksChunk]) -> None:
    del c[1]


def _no_layout(c: list[pb.KvBlocksChunk]) -> None:
    c[0].ClearField("layout")


def _layers_out_of_range(c: list[pb.KvBlocksChunk]) -> None:
    c[1].layer_start, c[1].layer_end = 1, 3


def _dst_on_a_later_chunk(c: list[pb.KvBlocksChunk]) -> None:
    c[1].dst_block_ids.extend([9, 10, 11, 12])


def _wrong_chunk_dtype(c: list[pb.KvBlocksChunk]) -> None:
    c[1].key.dtype = pb.INT32


def _nothing(c: list[pb.KvBlocksChunk]) -> None:
    c.clear()


@pytest.mark.parametrize(
    "corrupt, expected",
    [
        (_fewer_dst, "one more exported block than the 3 dst_block_ids"),
        (_more_dst, "the stream carried 4 blocks for 5 dst_block_ids"),
        (_bad_shape, "chunk 1: value has shape [1, 4, 4, 4, 8], expected [1, 4, 4, 2, 16]"),
        (_short_data, "needs 2048 bytes, got 2044"),
        (_layer_twice, "chunk 1: layer 0 of block 8 arrived twice"),
        (_ends_early, "layer 1 of block 8 (for dst block 0) never arrived"),
        (_no_layout, "the first chunk must carry the exporter's layout"),
        (_layers_out_of_range, "chunk 1: layers [1, 3) are not a non-empty range inside [0, 2)"),
        (_dst_on_a_later_chunk, "chunk 1: only the first chunk names model_id and dst_block_ids"),
        (_wrong_chunk_dtype, "chunk 1: key is INT32; the layout says FLOAT32"),
        (_nothing, "the stream carried no chunk"),
    ],
)
def test_malformed_import_streams_are_invalid_argument_and_write_nothing(
    filled_b: Worker, exported: KvBlocks, corrupt, expected: str
) -> None:
    b = filled_b.client
    chunks = raw_chunks(exported, DST)
    assert b._stub.ImportKvBlocks(iter(raw_chunks(exported, [20, 21, 22, 23])), timeout=30).blocks == 4
    before = b.export_kv_blocks("f32", DST)
    corrupt(chunks)
    with pytest.raises(grpc.RpcError) as info:
        b._stub.ImportKvBlocks(iter(chunks), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in info.value.details()
    assert same_blocks(b.export_kv_blocks("f32", DST), before)
    still_serving(b)


def test_a_stream_cut_in_the_middle_writes_nothing(filled_b: Worker, exported: KvBlocks) -> None:
    """The client dies after the first chunk (its request iterator fails): the call is cancelled, the
    half-received blocks are dropped."""
    b = filled_b.client
    before = b.export_kv_blocks("f32", DST)
    chunks = raw_chunks(exported, DST)

    def cut() -> Iterator[pb.KvBlocksChunk]:
        yield chunks[0]
        raise ConnectionError("the exporter went away")

    with pytest.raises(grpc.RpcError) as info:
        b._stub.ImportKvBlocks(cut(), timeout=30)
    assert info.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN)
    assert same_blocks(b.export_kv_blocks("f32", DST), before)
    # The full stream then goes through: nothing of the cut one lingers.
    assert b._stub.ImportKvBlocks(iter(chunks), timeout=30).blocks == 4
    assert same_blocks(
        b.export_kv_blocks("f32", DST),
        KvBlocks(exported.layout, exported.block_ids, exported.key, exported.value),
    )


def test_import_into_an_unknown_model_is_not_found(
    workers: tuple[Worker, Worker], exported: KvBlocks
) -> None:
    with pytest.raises(NotFoundError):
        workers[1].client.import_kv_blocks("nope", DST, exported)


@pytest.mark.parametrize(
    "ids, expected",
    [
        ([0, NUM_BLOCKS], f"block_ids[1] = {NUM_BLOCKS} is outside [0, {NUM_BLOCKS})"),
        ([3, 3], "block_ids[1] = 3 lists block 3 more than once"),
        ([], "block_ids is empty"),
    ],
)
def test_export_of_bad_block_ids_is_invalid_argument(
    workers: tuple[Worker, Worker], ids: list[int], expected: str
) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        workers[0].client.export_kv_blocks("f32", ids)
    assert expected in info.value.details


def test_export_of_an_unknown_model_is_not_found(workers: tuple[Worker, Worker]) -> None:
    with pytest.raises(NotFoundError):
        workers[0].client.export_kv_blocks("nope", [0])


# -- metrics --------------------------------------------------------------------------------------
def test_transfer_metrics_count_bytes_and_go_away_with_the_model(
    workers: tuple[Worker, Worker], exported: KvBlocks
) -> None:
    b = workers[1]
    kv = KvCacheConfig(block_size=BLOCK, num_blocks=8, max_seq_len=64)
    b.client.load("metered", "llama", dtype="float32", kv_cache=kv)
    b.client.import_kv_blocks("metered", [4, 5, 6, 7], exported)
    b.client.import_kv_blocks("metered", [0, 1, 2, 3], exported)
    out = b.client.export_kv_blocks("metered", [1, 7])
    s = scrape(b.metrics_port)
    assert s.types["modelworker_kv_transfer_bytes"] == "counter"
    assert s.types["modelworker_kv_transfer_seconds"] == "histogram"
    labels = dict(model="metered")
    assert s.value("modelworker_kv_transfer_bytes_total", direction="import", **labels) == 2 * exported.nbytes
    assert s.value("modelworker_kv_transfer_bytes_total", direction="export", **labels) == out.nbytes
    assert s.value("modelworker_kv_transfer_seconds_count", direction="import", **labels) == 2
    assert s.value("modelworker_kv_transfer_seconds_count", direction="export", **labels) == 1
    b.client.unload("metered")
    gone = scrape(b.metrics_port)
    assert not [
        x for x in gone.with_label("model", "metered") if x.name.startswith("modelworker_kv_transfer")
    ]
