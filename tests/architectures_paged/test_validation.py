"""Every way a forward_paged call can be malformed: the right error type, a message that names the
sequence and the field, and not one byte of the cache changed (the full path runs: prepare, then
attend on every layer, so a check that came too late would show up as a changed cache)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch

from architectures.backends import TorchBackend
from architectures.paged import PagedContext, PagedKvCache, prepare_paged_batch
from registry.errors import InvalidArgument, InvalidRequest, OutOfResources

BS = 16
VOCAB = 100
MAX_POS = 64


def _base_call() -> dict:
    """A valid mixed call: seq 0 prefills 5 tokens, seq 1 decodes at context 20 (two blocks), seq 2
    prefills 3 new tokens after a cached prefix of 16 (context 19)."""
    return dict(
        input_tokens=[1, 2, 3, 4, 5, 6, 7, 8, 9],
        positions=[0, 1, 2, 3, 4, 19, 16, 17, 18],
        block_tables=[[7], [2, 5], [3, 0]],
        slot_mapping=[7 * BS + 0, 7 * BS + 1, 7 * BS + 2, 7 * BS + 3, 7 * BS + 4, 5 * BS + 3, 0, 1, 2],
        context_lens=[5, 20, 19],
        is_prefill=True,
        query_lens=[5, 1, 3],
    )


@pytest.fixture(scope="module")
def cache() -> PagedKvCache:
    cache = PagedKvCache(2, 8, BS, 2, 8, torch.float32, "cpu")
    # Fill every slot so that an unintended write would be visible.
    cache.k[0].copy_(torch.randn_like(cache.k[0]))
    cache.k[1].copy_(torch.randn_like(cache.k[1]))
    cache.v[0].copy_(torch.randn_like(cache.v[0]))
    cache.v[1].copy_(torch.randn_like(cache.v[1]))
    return cache


def _run(cache: PagedKvCache, call: dict) -> None:
    batch = prepare_paged_batch(cache, **call, vocab_size=VOCAB, max_position_embeddings=MAX_POS)
    ctx = PagedContext(cache, batch, TorchBackend())
    n = batch.num_tokens
    for layer in range(cache.num_layers):
        ctx.attend(layer, torch.randn(n, 4, 8), torch.randn(n, 2, 8), torch.randn(n, 2, 8), None, 0.3)


def test_base_call_is_valid_and_writes() -> None:
    cache = PagedKvCache(2, 8, BS, 2, 8, torch.float32, "cpu")
    _run(cache, _base_call())
    assert cache.k[0].abs().sum() > 0


def _set(field: str, index: int | tuple[int, int] | None, value) -> Callable[[dict], None]:
    def edit(call: dict) -> None:
        if index is None:
            call[field] = value
        elif isinstance(index, tuple):
            call[field][index[0]][index[1]] = value
        else:
            call[field][index] = value

    return edit


def _drop(field: str) -> Callable[[dict], None]:
    return lambda call: call[field].pop()


def _many(*edits: Callable[[dict], None]) -> Callable[[dict], None]:
    def edit(call: dict) -> None:
        for e in edits:
            e(call)

    return edit


CASES = [
    # lengths that disagree
    ("positions short", _drop("positions"), InvalidRequest, ["positions has 8 entries", "add up to 9"]),
    ("tokens short", _drop("input_tokens"), InvalidRequest, ["input_tokens has 8 entries"]),
    ("slots short", _drop("slot_mapping"), InvalidRequest, ["slot_mapping has 8 entries"]),
    ("tables short", _drop("block_tables"), InvalidRequest, ["block_tables has 2 entries", "3 sequences"]),
    ("query_lens short", _drop("query_lens"), InvalidRequest, ["query_lens has 2 entries", "3 sequences"]),
    (
        "empty batch",
        _many(*(_set(f, None, []) for f in _base_call() if f not in ("is_prefill",))),
        InvalidRequest,
        ["empty batch"],
    ),
    # ranges
    (
        "token = vocab",
        _set("input_tokens", 6, VOCAB),
        InvalidRequest,
        ["sequence 2", "input_tokens[6] = 100", "vocabulary"],
    ),
    ("token < 0", _set("input_tokens", 0, -1), InvalidRequest, ["sequence 0", "input_tokens[0] = -1"]),
    (
        "position = max",
        _set("positions", 5, MAX_POS),
        InvalidRequest,
        ["sequence 1", "positions[5] = 64", "max_position_embeddings 64"],
    ),
    ("position < 0", _set("positions", 2, -3), InvalidRequest, ["sequence 0", "positions[2] = -3"]),
    (
        "block id = num_blocks",
        _set("block_tables", (1, 0), 8),
        InvalidRequest,
        ["sequence 1", "block_tables[1][0] = 8", "[0, 8)"],
    ),
    (
        "block id < 0",
        _set("block_tables", (2, 1), -1),
        InvalidRequest,
        ["sequence 2", "block_tables[2][1] = -1"],
    ),
    (
        "slot = num slots",
        _set("slot_mapping", 5, 8 * BS),
        InvalidRequest,
        ["sequence 1", "slot_mapping[5] = 128", "[-1, 128)"],
    ),
    ("slot < -1", _set("slot_mapping", 8, -2), InvalidRequest, ["sequence 2", "slot_mapping[8] = -2"]),
    # duplicate slots in one call (seq 2 shares seq 0's block; both write slot 7 * 16 + 1)
    (
        "duplicate slot",
        _many(_set("block_tables", (2, 0), 7), _set("slot_mapping", 7, 7 * BS + 1)),
        InvalidRequest,
        ["sequence 2", "slot_mapping[7] = 113 repeats the slot of slot_mapping[1] (sequence 0)"],
    ),
    # a slot where the sequence's block table does not put that token
    (
        "slot off its block table",
        _set("slot_mapping", 5, 2 * BS + 3),
        InvalidRequest,
        [
            "sequence 1",
            "slot_mapping[5] = 35",
            "token 19 of the sequence belongs in block 5 at offset 3 (slot 83)",
        ],
    ),
    (
        "block listed twice",
        _set("block_tables", (1, 1), 2),
        InvalidRequest,
        ["sequence 1", "lists block 2 more than once"],
    ),
    # context / query lengths
    (
        "context beyond blocks",
        _many(_set("context_lens", 1, 40), _set("positions", 5, 39)),
        InvalidRequest,
        ["sequence 1: context_len 40 exceeds its 2 blocks of 16 tokens (32)"],
    ),
    ("context 0", _set("context_lens", 0, 0), InvalidRequest, ["sequence 0: context_len 0"]),
    (
        "context beyond the cache",
        _set("context_lens", 2, 8 * BS + 1),
        OutOfResources,
        ["sequence 2: context_len 129 exceeds the whole paged cache", "8 blocks of 16 tokens"],
    ),
    ("query 0", _set("query_lens", 1, 0), InvalidRequest, ["sequence 1: query_len 0"]),
    (
        "query beyond context",
        _many(_set("context_lens", 0, 4)),
        InvalidRequest,
        ["sequence 0: query_len 5 is outside [1, context_len 4]"],
    ),
    (
        "decode with 5 queries",
        _set("is_prefill", None, False),
        InvalidRequest,
        ["sequence 0: query_len 5 in a decode call"],
    ),
    # types and shapes
    (
        "float tokens",
        _set("input_tokens", None, torch.ones(9)),
        InvalidRequest,
        ["input_tokens must hold integers"],
    ),
    (
        "2-D slots",
        _set("slot_mapping", None, torch.zeros(3, 3, dtype=torch.long)),
        InvalidRequest,
        ["slot_mapping must be 1-D"],
    ),
    (
        "float context_len",
        _set("context_lens", 0, 5.0),
        InvalidRequest,
        ["context_lens[0] must be an integer"],
    ),
]


@pytest.mark.parametrize(("edit", "error", "parts"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_rejected_call_names_the_fault_and_writes_nothing(
    cache: PagedKvCache, edit: Callable[[dict], None], error: type[Exception], parts: list[str]
) -> None:
    call = copy.deepcopy(_base_call())
    edit(call)
    before_k, before_v = cache._k.clone(), cache._v.clone()
    with pytest.raises(error) as info:
        _run(cache, call)
    message = str(info.value)
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"
    assert torch.equal(cache._k, before_k) and torch.equal(cache._v, before_v)


def test_invalid_request_is_an_invalid_argument() -> None:
    """The worker maps InvalidArgument to INVALID_ARGUMENT and OutOfResources to RESOURCE_EXHAUSTED."""
    assert issubclass(InvalidRequest, InvalidArgument)
    assert OutOfResources.kind == "resource_exhausted"


def test_cache_arguments_are_checked() -> None:
    with pytest.raises(InvalidArgument, match="block_size must be a positive integer, got 0"):
        PagedKvCache(2, 8, 0, 2, 8, torch.float32, "cpu")


def test_cache_that_cannot_be_allocated_is_out_of_resources() -> None:
    with pytest.raises(OutOfResources, match="does not fit on cpu"):
        PagedKvCache(1 << 20, 1 << 20, 1 << 10, 8, 128, torch.float32, "cpu")


def test_cache_size_and_reset() -> None:
    cache = PagedKvCache(3, 5, 4, 2, 8, torch.float16, "cpu")
    assert cache.nbytes == 2 * 3 * 5 * 4 * 2 * 8 * 2
    assert cache.k[2].shape == (5, 4, 2, 8) and cache.k[2].is_contiguous()
    cache.v[1].fill_(1.0)
    cache.reset()
    assert not cache.v[1].any()
