"""The model side of KV transfer without a server: reading and writing paged blocks against plain
indexing, all-or-nothing writes, and the export chunk plan's coverage and sizes."""

from __future__ import annotations

import random

import pytest
import torch

from architectures.kv_blocks import layout_of, read_blocks, write_blocks
from architectures.paged import PagedKvCache
from registry.errors import IncompatibleLayout, InvalidRequest, OutOfResources
from registry.model import KvLayout
from worker.kv_transfer import CHUNK_TARGET_BYTES, plan_chunks


@pytest.fixture
def cache() -> PagedKvCache:
    torch.manual_seed(random.randrange(2**31))
    c = PagedKvCache(3, 10, 4, 2, 8, torch.bfloat16, "cpu")
    k, v = c.stacked()
    k.normal_()
    v.normal_()
    return c


def test_read_gathers_blocks_in_the_order_asked(cache: PagedKvCache) -> None:
    ids = [7, 2, 9, 0]
    k, v = read_blocks(cache, ids, 1, 3)
    assert k.shape == (2, 4, 4, 2, 8) and k.dtype == torch.bfloat16
    for j, b in enumerate(ids):
        for layer in (1, 2):
            assert torch.equal(k[layer - 1, j], cache.k[layer][b])
            assert torch.equal(v[layer - 1, j], cache.v[layer][b])
    k[:] = 0  # a copy: the cache is untouched
    assert cache.k[1][7].abs().sum() > 0


def test_write_puts_each_block_where_asked(cache: PagedKvCache) -> None:
    k, v = read_blocks(cache, [1, 3])
    write_blocks(cache, [8, 5], k, v)
    for layer in range(3):
        assert torch.equal(cache.k[layer][8], cache.k[layer][1])
        assert torch.equal(cache.v[layer][5], cache.v[layer][3])


@pytest.mark.parametrize(
    "dst, change, error, expected",
    [
        ([4, 10], None, InvalidRequest, "dst_block_ids[1] = 10 is outside [0, 10)"),
        ([4, 4], None, InvalidRequest, "lists block 4 more than once"),
        (
            [4, 5],
            lambda t: t.float(),
            IncompatibleLayout,
            "holds torch.float32; this cache holds torch.bfloat16",
        ),
        ([4, 5], lambda t: t[:2], IncompatibleLayout, "block_size 4, kv_heads 2, head_dim 8"),
        ([4, 5, 6], None, InvalidRequest, "expected [3, 3, 4, 2, 8]"),
    ],
)
def test_a_refused_write_changes_nothing(cache: PagedKvCache, dst, change, error, expected) -> None:
    k, v = read_blocks(cache, [0, 1])
    if change is not None:
        v = change(v)
    before = [t.clone() for t in cache.stacked()]
    with pytest.raises(error) as info:
        write_blocks(cache, dst, k, v)
    assert expected in str(info.value)
    assert all(torch.equal(a, b) for a, b in zip(before, cache.stacked(), strict=True))


def test_layout_reports_the_cache() -> None:
    c = PagedKvCache(2, 3, 16, 4, 64, torch.float16, "cpu")
    assert layout_of(c) == KvLayout(2, 16, 4, 64, torch.float16)
    assert layout_of(c).block_bytes == 2 * 2 * 16 * 4 * 64 * 2


@pytest.mark.parametrize(
    "layout, blocks, cap",
    [
        (KvLayout(30, 16, 3, 64, torch.bfloat16), 256, 256 * 1024 * 1024),  # SmolLM2: whole layers
        (KvLayout(30, 16, 3, 64, torch.float32), 256, 1024 * 1024),  # one layer of runs of blocks
        (KvLayout(2, 32, 2, 16, torch.float32), 16, 65536),
        (KvLayout(5, 4, 1, 8, torch.float32), 7, 65536),
    ],
)
def test_chunk_plan_covers_every_layer_of_every_block_once_under_the_cap(
    layout: KvLayout, blocks: int, cap: int
) -> None:
    seen = torch.zeros((layout.num_layers, blocks), dtype=torch.int32)
    for p in plan_chunks(layout, blocks, cap):
        payload = (p.layer_end - p.layer_start) * (p.block_end - p.block_start) * layout.layer_block_bytes
        assert payload <= min(cap - 4096, CHUNK_TARGET_BYTES)
        seen[p.layer_start : p.layer_end, p.block_start : p.block_end] += 1
    assert bool((seen == 1).all())


def test_a_block_layer_over_the_cap_is_resource_exhausted() -> None:
    with pytest.raises(OutOfResources, match="raise --max-message-bytes"):
        plan_chunks(KvLayout(2, 256, 8, 128, torch.float32), 4, 65536)


def test_a_model_without_a_paged_cache_refuses_transfers(tmp_path) -> None:  # noqa: ANN001
    from registry import LoadOptions, ModelConfig
    from registry.errors import FailedPrecondition
    from tests.registry.toy import ToyModel, Tracker, write_toy_dir

    config = ModelConfig.from_file(write_toy_dir(tmp_path / "toy") / "config.json")
    model = ToyModel(config, torch.device("cpu"), LoadOptions(), Tracker())
    assert model.kv_layout is None
    with pytest.raises(FailedPrecondition, match="has no paged KV cache to export"):
        model.export_kv_blocks([0])
    with pytest.raises(FailedPrecondition, match="has no paged KV cache to import into"):
        model.import_kv_blocks([0], torch.zeros(1), torch.zeros(1))
