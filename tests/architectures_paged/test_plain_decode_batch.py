"""The plain-Python check of small decode calls (`_plain_decode_batch`) against the general path:
on random calls, valid and broken in every way a field can be, both give the same batch or the
same error (type and message), and the plain path takes every valid small decode call."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import fields

import numpy as np
import pytest
import torch

from architectures import paged_batch
from architectures.paged import PagedKvCache, prepare_paged_batch
from registry.errors import InvalidRequest

BS = 4
BLOCKS = 12
VOCAB = 50
MAX_POS = 40


@pytest.fixture(scope="module")
def cache() -> PagedKvCache:
    return PagedKvCache(1, BLOCKS, BS, 1, 4, torch.float32, "cpu")


def _valid_call(rng: random.Random, n: int) -> dict:
    tables, ctx, slots = [], [], []
    for _ in range(n):
        table = rng.sample(range(BLOCKS), rng.randint(1, 4))  # sequences may share blocks
        c = rng.randint(1, min(len(table) * BS, MAX_POS))
        tables.append(table)
        ctx.append(c)
        slots.append(table[(c - 1) // BS] * BS + (c - 1) % BS)
    # Sequences that share the block of their new token must not write the same slot: pad all but one.
    seen: set[int] = set()
    for s, slot in enumerate(slots):
        if slot in seen or rng.random() < 0.1:
            slots[s] = -1
        seen.add(slot)
    given = rng.choice([None, [], [1] * n])  # the default, an empty list, or decode's ones
    return dict(
        **({} if given is None else {"query_lens": given}),
        input_tokens=[rng.randrange(VOCAB) for _ in range(n)],
        positions=[c - 1 for c in ctx],
        block_tables=tables,
        slot_mapping=slots,
        context_lens=ctx,
        is_prefill=False,
    )


def _breakages(rng: random.Random, call: dict) -> list[Callable[[dict], None]]:
    """Edits that each make the call invalid, or of a form the plain path leaves to the general one
    (bool or NumPy values, a tuple of tables)."""
    n = len(call["context_lens"])
    s = rng.randrange(n)

    def put(field: str, value, index: int | None = s) -> Callable[[dict], None]:
        def edit(c: dict) -> None:
            if index is None:
                c[field] = value
            else:
                c[field][index] = value

        return edit

    table = call["block_tables"][s]
    return [
        put("input_tokens", VOCAB),
        put("input_tokens", -1),
        put("input_tokens", True),
        put("input_tokens", np.int64(3)),
        put("positions", MAX_POS),
        put("positions", -1),
        put("slot_mapping", -2),
        put("slot_mapping", BLOCKS * BS),
        put("slot_mapping", (call["slot_mapping"][s] + 1) % (BLOCKS * BS)),
        put("context_lens", 0),
        put("context_lens", len(table) * BS + 1),
        put("block_tables", [*table, table[0]]),
        put("block_tables", [BLOCKS] + table[1:]),
        put("block_tables", [-1] + table[1:]),
        put("block_tables", []),
        put("input_tokens", call["input_tokens"][:-1], None),
        put("positions", [*call["positions"], 0], None),
        put("slot_mapping", call["slot_mapping"][:-1], None),
        put("block_tables", call["block_tables"][:-1], None),
        put("context_lens", [], None),
        put("input_tokens", torch.tensor(call["input_tokens"], dtype=torch.float32), None),
        put("positions", torch.tensor([call["positions"]]), None),
        put("block_tables", tuple(call["block_tables"]), None),
        put("query_lens", [1] * (n + 1), None),
        put("query_lens", [2] + [1] * (n - 1), None),
        put("query_lens", [1.0] * n, None),
    ]


def _outcome(cache: PagedKvCache, call: dict):
    try:
        return prepare_paged_batch(cache, **call, vocab_size=VOCAB, max_position_embeddings=MAX_POS)
    except Exception as exc:  # the general path's errors are what the plain path must give too
        return type(exc), str(exc)


def _same(a, b) -> None:
    if isinstance(a, tuple) or isinstance(b, tuple):
        assert a == b
        return
    for f in fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            assert x is not None and y is not None, f.name
            assert x.dtype == y.dtype and torch.equal(x, y), f.name
        else:
            assert x == y, f.name


def _as_tensors(call: dict, dtype: torch.dtype) -> dict:
    out = dict(call)
    for field in ("input_tokens", "positions", "slot_mapping", "context_lens"):
        out[field] = torch.tensor(call[field], dtype=dtype)
    return out


def test_the_plain_path_agrees_with_the_general_one(cache, monkeypatch) -> None:
    rng = random.Random(0)
    plain_calls = 0
    original = paged_batch._plain_decode_batch

    def counting(*args, **kwargs):
        nonlocal plain_calls
        out = original(*args, **kwargs)
        plain_calls += out is not None
        return out

    monkeypatch.setattr(paged_batch, "_plain_decode_batch", counting)
    valid = errors = 0
    for trial in range(300):
        n = rng.randint(1, paged_batch.PLAIN_DECODE_SEQS + 2)
        call = _valid_call(rng, n)
        if trial % 3 == 1:
            call = _as_tensors(call, torch.long if trial % 2 else torch.int32)
        broken = rng.random() < 0.7
        if broken:
            rng.choice(
                _breakages(rng, {k: list(v) if isinstance(v, torch.Tensor) else v for k, v in call.items()})
            )(call)
        before = plain_calls
        ours = _outcome(cache, call)
        took_plain = plain_calls > before
        monkeypatch.setattr(paged_batch, "PLAIN_DECODE_SEQS", 0)  # the general path alone
        general = _outcome(cache, call)
        monkeypatch.setattr(paged_batch, "PLAIN_DECODE_SEQS", 16)
        _same(ours, general)
        errors += isinstance(general, tuple)
        if not broken:
            valid += 1
            # every valid small call takes the plain path; a larger one the general path
            assert took_plain == (n <= paged_batch.PLAIN_DECODE_SEQS), call
        elif took_plain:  # a broken call the general path took (a bool or NumPy token, say) is fine
            assert not isinstance(general, tuple)
    assert valid > 60 and errors > 150 and plain_calls > valid // 2  # every kind was exercised


def test_a_padded_slot_is_not_stored(cache) -> None:
    call = dict(
        input_tokens=[1, 2],
        positions=[4, 0],
        block_tables=[[3, 5], [7]],
        slot_mapping=[5 * BS + 0, -1],
        context_lens=[5, 1],
        is_prefill=False,
    )
    batch = prepare_paged_batch(cache, **call, vocab_size=VOCAB, max_position_embeddings=MAX_POS)
    assert batch.store_slots.tolist() == [5 * BS] and batch.store_rows.tolist() == [0]
    assert batch.block_table.tolist() == [[3, 5], [7, 0]] and batch.block_table.dtype == torch.int32
    assert batch.cu_context_lens.tolist() == [0, 5, 6] and batch.last_token_indices.tolist() == [0, 1]


def test_contexts_beyond_int32_offsets_are_refused_on_both_paths() -> None:
    """16 sequences sharing one 2^27-token context add up to 2^31 tokens: more than the int32
    offsets (cu_context_lens) hold. Both paths refuse it instead of wrapping (the cache is a lazy
    map: only its address space is taken)."""
    bs = 1 << 20
    huge = PagedKvCache(1, 128, bs, 1, 1, torch.float32, "cpu")
    n, ctx = 16, 1 << 27
    table = list(range(128))
    call = dict(
        input_tokens=[1] * n,
        positions=[0] * n,
        block_tables=[table] * n,
        slot_mapping=[ctx - 1] + [-1] * (n - 1),  # one sequence stores its token, the others pad
        context_lens=[ctx] * n,
        is_prefill=False,
    )
    for plain in (16, 0):
        paged_batch.PLAIN_DECODE_SEQS, saved = plain, paged_batch.PLAIN_DECODE_SEQS
        try:
            with pytest.raises(InvalidRequest, match="context lengths add up to 2147483648 tokens"):
                prepare_paged_batch(huge, **call, vocab_size=VOCAB, max_position_embeddings=MAX_POS)
        finally:
            paged_batch.PLAIN_DECODE_SEQS = saved
    call["context_lens"] = [ctx] + [ctx - 1] * (n - 1)  # one token fewer in all: accepted
    batch = prepare_paged_batch(huge, **call, vocab_size=VOCAB, max_position_embeddings=MAX_POS)
    assert batch.cu_context_lens[-1].item() == (1 << 31) - 1 - (n - 2)
