"""The attention context of `forward_paged`: each layer stores its K/V at the batch's slots with one
vectorized op, then hands attention to the backend chosen at Load.

The cache and the batch live in architectures/paged_batch.py and the backend protocol in
architectures/backends/protocol.py; both are re-exported here for the callers of `forward_paged`'s
pieces.
"""

from __future__ import annotations

from typing import Generic, TypeVar

import torch

from .backends.protocol import AttentionBackend
from .paged_batch import IntsLike, PagedBatch, PagedKvCache, prepare_paged_batch

PlanT = TypeVar("PlanT")


class PagedContext(Generic[PlanT]):
    """The attention context of one `forward_paged` call (see architectures/attention.py).

    q [num_tokens, n_heads, head_dim], k/v [num_tokens, n_kv_heads, head_dim] → [num_tokens,
    n_heads, head_dim]. Each layer first stores its K/V at the batch's slots, then attends through
    the backend, which reads every key (the new ones included) from the cache.
    """

    def __init__(self, cache: PagedKvCache, batch: PagedBatch, backend: AttentionBackend[PlanT]) -> None:
        if batch.block_size != cache.block_size:
            raise ValueError("the batch was prepared for a cache with another block size")
        self.cache = cache
        self.batch = batch
        self.backend = backend
        self.plan: PlanT = backend.plan(cache, batch)  # per-call metadata reused by every layer
        self._backend_store = getattr(backend, "store", None)  # looked up once, not per layer

    def store(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """One indexed copy per side for the whole batch (no loop over tokens), or the backend's own
        store kernel where it has one."""
        b = self.batch
        backend_store = self._backend_store
        if backend_store is not None:
            backend_store(self.cache, layer_idx, k, v, b)
            return
        k_flat, v_flat = self.cache.flat_k(layer_idx), self.cache.flat_v(layer_idx)
        if k.dtype != k_flat.dtype:  # a check in Python costs less than a no-op cast's dispatch
            k, v = k.to(k_flat.dtype), v.to(v_flat.dtype)
        if b.store_rows is None:
            k_flat.index_copy_(0, b.store_slots, k)
            v_flat.index_copy_(0, b.store_slots, v)
        elif b.store_slots.numel():
            k_flat.index_copy_(0, b.store_slots, k.index_select(0, b.store_rows))
            v_flat.index_copy_(0, b.store_slots, v.index_select(0, b.store_rows))

    def attend(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        window: int | None,
        scale: float,
        softcap: float | None = None,
    ) -> torch.Tensor:
        n = self.batch.num_tokens
        c = self.cache
        if q.dim() != 3 or q.shape[0] != n or q.shape[2] != c.head_dim or q.shape[1] % c.num_kv_heads:
            raise ValueError(
                f"q has shape {list(q.shape)}; expected [{n}, k * {c.num_kv_heads}, {c.head_dim}]"
            )
        if k.shape != (n, c.num_kv_heads, c.head_dim) or v.shape != k.shape:
            raise ValueError(
                f"k/v have shapes {list(k.shape)}/{list(v.shape)}; expected [{n}, {c.num_kv_heads}, {c.head_dim}]"
            )
        self.store(layer_idx, k, v)
        if softcap is None:  # backends written before softcapping need not take the argument
            return self.backend.attend(self.cache, layer_idx, q, self.batch, self.plan, window, scale)
        return self.backend.attend(
            self.cache, layer_idx, q, self.batch, self.plan, window, scale, softcap=softcap
        )


__all__ = ["IntsLike", "PagedBatch", "PagedContext", "PagedKvCache", "prepare_paged_batch"]
