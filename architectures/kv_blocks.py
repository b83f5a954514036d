"""Reading whole blocks out of the paged KV cache and writing them back in (KV block transfer).

A block's content is K and V of `block_size` tokens for every layer; moving it to another cache (another
worker, or host memory while its sequence is preempted) moves `[layers, blocks, block_size, kv_heads,
head_dim]` per side. Reads are one `index_select` per side over the stacked cache, writes one
`index_copy_`; both take block ids in any order. Everything is checked before the write, so a refused
import leaves the cache as it was.

A tensor-parallel cache (heads split across ranks) would gather heads after the read and scatter them
before the write; the layout reported here is always the full model's.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

from registry.errors import IncompatibleLayout, InvalidRequest
from registry.model import KvLayout

from .paged_batch import PagedKvCache


def layout_of(cache: PagedKvCache) -> KvLayout:
    return KvLayout(cache.num_layers, cache.block_size, cache.num_kv_heads, cache.head_dim, cache.dtype)


def check_block_ids(block_ids: Sequence[int], num_blocks: int, field: str) -> list[int]:
    """Integer ids, each in [0, num_blocks) and listed once; InvalidRequest naming the first bad one."""
    if isinstance(block_ids, torch.Tensor):
        block_ids = block_ids.tolist()
    ids: list[int] = []
    for i, b in enumerate(block_ids):
        try:
            if isinstance(b, bool):
                raise TypeError
            ids.append(operator.index(b))
        except TypeError:
            raise InvalidRequest(f"{field}[{i}] must be an integer, got {b!r}") from None
    if not ids:
        raise InvalidRequest(f"{field} is empty: name at least one block")
    if len(ids) > num_blocks:
        raise InvalidRequest(f"{field} lists {len(ids)} blocks; the cache has {num_blocks}")
    seen: set[int] = set()
    for i, b in enumerate(ids):
        if not 0 <= b < num_blocks:
            raise InvalidRequest(f"{field}[{i}] = {b} is outside [0, {num_blocks})")
        if b in seen:
            raise InvalidRequest(f"{field}[{i}] = {b} lists block {b} more than once")
        seen.add(b)
    return ids


def read_blocks(
    cache: PagedKvCache, block_ids: Sequence[int], layer_start: int = 0, layer_end: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Host copies of K and V: [layer_end - layer_start, len(block_ids), block_size, kv_heads, head_dim]."""
    ids = check_block_ids(block_ids, cache.num_blocks, "block_ids")
    end = cache.num_layers if layer_end is None else layer_end
    if not 0 <= layer_start < end <= cache.num_layers:
        raise InvalidRequest(f"layers [{layer_start}, {end}) are not a range inside [0, {cache.num_layers})")
    index = torch.tensor(ids, dtype=torch.long, device=cache.device)
    stacked_k, stacked_v = cache.stacked()
    k = stacked_k[layer_start:end].index_select(1, index)
    v = stacked_v[layer_start:end].index_select(1, index)
    return k.to("cpu"), v.to("cpu")


def write_blocks(
    cache: PagedKvCache, dst_block_ids: Sequence[int], key: torch.Tensor, value: torch.Tensor
) -> None:
    """Write K and V of every layer into `dst_block_ids`, all or nothing."""
    ids = check_block_ids(dst_block_ids, cache.num_blocks, "dst_block_ids")
    layout = layout_of(cache)
    want = (layout.num_layers, len(ids), layout.block_size, layout.num_kv_heads, layout.head_dim)
    for name, t in (("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise InvalidRequest(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dtype != layout.dtype:
            raise IncompatibleLayout(f"{name} holds {t.dtype}; this cache holds {layout.dtype}")
        if tuple(t.shape) != want:
            layers, _, bs, heads, dim = want
            if t.dim() == 5 and (t.shape[0], *t.shape[2:]) != (layers, bs, heads, dim):
                raise IncompatibleLayout(
                    f"{name} has shape {list(t.shape)}; this cache's blocks are [layers {layers}, blocks, "
                    f"block_size {bs}, kv_heads {heads}, head_dim {dim}]"
                )
            raise InvalidRequest(f"{name} has shape {list(t.shape)}, expected {list(want)}")
    index = torch.tensor(ids, dtype=torch.long, device=cache.device)
    # Move both sides to the device before the first write: a failed copy then writes nothing.
    k, v = key.to(cache.device), value.to(cache.device)
    stacked_k, stacked_v = cache.stacked()
    stacked_k.index_copy_(1, index, k)
    stacked_v.index_copy_(1, index, v)
