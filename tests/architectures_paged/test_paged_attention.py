"""PagedContext over the torch backend against a naive dense reference, through a realistic call
sequence: prefill, decode steps, a chunked prefill and a prefix-cached prefill (query_len <
context_len), a mixed prefill+decode batch, and blocks freed and handed to a new sequence."""

from __future__ import annotations

import pytest
import torch

from architectures.backends import TorchBackend
from architectures.paged import PagedContext, PagedKvCache, prepare_paged_batch

from .reference import PagedSim, naive_attention

TOL = 1e-5  # float32 against float64

# block size → prefill lengths of three sequences (each spans several blocks, one leaves a partial block)
LENGTHS = {1: [5, 11, 17], 16: [9, 23, 40], 256: [300, 20, 513]}


@pytest.mark.parametrize("block_size", [1, 16, 256])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(6, 2), (2, 2)])
def test_paged_attention_matches_dense_reference(block_size: int, num_heads: int, num_kv_heads: int) -> None:
    lengths = LENGTHS[block_size]
    num_blocks = 4 * sum(-(-n // block_size) + 2 for n in lengths)
    cache = PagedKvCache(2, num_blocks, block_size, num_kv_heads, 8, torch.float32, "cpu")
    # Layer 0 attends fully, layer 1 through a window shorter than every context.
    sim = PagedSim(cache, TorchBackend(), num_heads, windows=[None, 4], seed=block_size * 10 + num_heads)
    errors = {}
    errors["prefill"] = sim.step([(0, lengths[0]), (1, lengths[1]), (2, lengths[2])])
    for i in range(3):
        errors[f"decode {i}"] = sim.step([(0, 1), (1, 1), (2, 1)], is_prefill=False)
    # Sequence 0 finishes; its blocks return to the free list holding stale K/V.
    sim.release(0)
    # Chunked prefill of sequence 1 and a new sequence 3 that shares sequence 2's first full blocks.
    sim.fork(2, 3, blocks=lengths[2] // block_size)
    errors["prefix-cached prefill"] = sim.step([(1, 7), (3, 6)])
    # Mixed batch: a new sequence 4 (on reused blocks) prefills while 1, 2 and 3 decode.
    errors["mixed"] = sim.step([(2, 1), (4, 13), (1, 1), (3, 1)], is_prefill=True)
    errors["decode after mixed"] = sim.step([(4, 1), (3, 1), (2, 1), (1, 1)], is_prefill=False)
    bad = {k: e for k, e in errors.items() if not e <= TOL}
    assert not bad, f"paged attention differs from the reference: {bad}"


def test_cache_holds_each_token_at_its_slot() -> None:
    """After the calls, K of every token sits at block_table[i // bs] * bs + i % bs of its layer."""
    cache = PagedKvCache(2, 40, 4, 2, 8, torch.float32, "cpu")
    sim = PagedSim(cache, TorchBackend(), 4, windows=[None, None], seed=3)
    sim.step([(0, 10), (1, 3)])
    sim.step([(0, 1), (1, 1)], is_prefill=False)
    for seq in sim.seqs.values():
        idx = torch.arange(seq.length)
        slots = torch.tensor(seq.table)[idx // 4] * 4 + idx % 4
        for layer in range(2):
            assert torch.equal(cache.flat_k(layer)[slots], seq.k[layer])
            assert torch.equal(cache.flat_v(layer)[slots], seq.v[layer])


def test_windowed_decode_ignores_keys_before_the_window() -> None:
    """Keys older than the window do not matter: overwrite them with garbage, the output is unchanged."""
    cache = PagedKvCache(1, 16, 4, 1, 8, torch.float32, "cpu")
    sim = PagedSim(cache, TorchBackend(), 2, windows=[3], seed=5)
    sim.step([(0, 20)])
    call = sim.build_call([(0, 1)], is_prefill=False)
    q, k, v = torch.randn(1, 2, 8), torch.randn(1, 1, 8), torch.randn(1, 1, 8)
    batch = prepare_paged_batch(cache, **call, vocab_size=1000, max_position_embeddings=100)
    before = PagedContext(cache, batch, TorchBackend()).attend(0, q, k, v, 3, 0.5)
    old = torch.tensor(sim.seqs[0].table)[torch.arange(18) // 4] * 4 + torch.arange(18) % 4  # tokens 0..17
    cache.flat_k(0)[old] = 1e4
    cache.flat_v(0)[old] = -1e4
    after = PagedContext(cache, batch, TorchBackend()).attend(0, q, k, v, 3, 0.5)
    assert torch.allclose(before, after, atol=1e-6)


def test_slot_minus_one_skips_the_store() -> None:
    """A token with slot -1 is not stored; others in the same call are, and attention reads the cache."""
    cache = PagedKvCache(1, 8, 4, 1, 8, torch.float32, "cpu")
    sim = PagedSim(cache, TorchBackend(), 2, windows=[None], seed=7)
    sim.step([(0, 3), (1, 2)])
    call = sim.build_call([(0, 1), (1, 1)], is_prefill=False)
    skipped, written = int(call["slot_mapping"][0]), int(call["slot_mapping"][1])
    call["slot_mapping"][0] = -1
    batch = prepare_paged_batch(cache, **call, vocab_size=1000, max_position_embeddings=100)
    q, k, v = torch.randn(2, 2, 8), torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    out = PagedContext(cache, batch, TorchBackend()).attend(0, q, k, v, None, 0.5)
    assert torch.equal(cache.flat_k(0)[skipped], torch.zeros(1, 8))
    assert torch.equal(cache.flat_k(0)[written], k[1])
    assert torch.equal(cache.flat_v(0)[written], v[1])
    # Sequence 0's newest key is whatever its slot holds (zeros), exactly as the reference with zeros.
    k0 = torch.cat([sim.seqs[0].k[0], torch.zeros(1, 1, 8)])
    v0 = torch.cat([sim.seqs[0].v[0], torch.zeros(1, 1, 8)])
    assert torch.allclose(out[0:1].double(), naive_attention(q[0:1], k0, v0, None, 0.5), atol=TOL)


def test_batch_tensors() -> None:
    cache = PagedKvCache(1, 8, 4, 1, 8, torch.float32, "cpu")
    batch = prepare_paged_batch(
        cache,
        [5, 6, 7, 8, 9],
        [0, 1, 2, 7, 3],
        [[2, 0], [6, 1], [3]],
        [8, 9, 10, 7, 15],
        [3, 8, 4],
        True,
        [3, 1, 1],
        vocab_size=10,
        max_position_embeddings=16,
    )
    assert batch.last_token_indices.tolist() == [2, 3, 4]
    assert batch.input_tokens.dtype == torch.long and batch.input_tokens.tolist() == [5, 6, 7, 8, 9]
    assert batch.positions.dtype == torch.long and batch.positions.tolist() == [0, 1, 2, 7, 3]
    assert batch.cu_query_lens.tolist() == [0, 3, 4, 5]
    assert batch.cu_context_lens.tolist() == [0, 3, 11, 15]
    assert batch.block_table.tolist() == [[2, 0], [6, 1], [3, 0]]
    assert (batch.max_query_len, batch.max_context_len, batch.is_decode_only) == (3, 8, False)


@pytest.mark.parametrize(
    ("is_prefill", "query_lens", "expected"),
    [(True, None, [3, 2]), (True, [], [3, 2]), (False, None, [1, 1])],
)
def test_query_lens_default(is_prefill: bool, query_lens: list[int] | None, expected: list[int]) -> None:
    """Omitted query_lens: the whole context is new for prefill, one token per sequence for decode."""
    cache = PagedKvCache(1, 8, 4, 1, 8, torch.float32, "cpu")
    if is_prefill:
        tokens, positions, slots = [1, 2, 3, 4, 5], [0, 1, 2, 0, 1], [0, 1, 2, 4, 5]
    else:
        tokens, positions, slots = [1, 2], [2, 1], [2, 5]
    batch = prepare_paged_batch(
        cache,
        tokens,
        positions,
        [[0], [1]],
        slots,
        [3, 2],
        is_prefill,
        query_lens,
        vocab_size=10,
        max_position_embeddings=16,
    )
    assert batch.query_lens == expected
