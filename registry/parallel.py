"""Tensor parallelism: which rank holds which slice of a model, and the collectives between ranks.

A `ParallelContext` (rank, world size, the torch.distributed group of the model's collectives) is
made once per worker process and handed explicitly to a Load through its `LoadPlan`; every sharded
layer keeps the context it was built with. Nothing here is global.

Splits (Megatron-style):
- attention by KV groups (a KV head with its query heads), as evenly as possible; a group never
  straddles ranks; uneven splits are allowed (3 KV groups over 2 ranks: 2 + 1). With fewer KV heads
  than ranks, the ranks are spread over the KV heads (each rank holds one KV head, replicated) and
  each KV head's query heads are split among its ranks. Only fewer query heads than ranks has no
  valid split.
- MLP intermediate rows, and the vocabulary (embedding and lm_head rows), in contiguous ranges.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from .errors import InvalidConfig


@dataclass(frozen=True)
class TensorSlice:
    """The part of a checkpoint tensor one rank reads: `length` entries from `start` along `dim`
    (of the per-expert tensor), out of `full` in the checkpoint."""

    dim: int
    start: int
    length: int
    full: int


def even_range(total: int, parts: int, index: int) -> tuple[int, int]:
    """[start, end) of part `index` when `total` items are split into `parts` contiguous runs whose
    sizes differ by at most one (the first `total % parts` runs get one more)."""
    base, extra = divmod(total, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


@dataclass(frozen=True)
class AttentionShard:
    """One rank's heads: query heads [q_start, q_start + num_heads), KV heads
    [kv_start, kv_start + num_kv_heads). Local query head j uses local KV head j // (num_heads //
    num_kv_heads), as on one device."""

    q_start: int
    num_heads: int
    kv_start: int
    num_kv_heads: int


def attention_shard(num_heads: int, num_kv_heads: int, world_size: int, rank: int) -> AttentionShard:
    """The heads `rank` holds (see the module docstring); InvalidConfig when no split exists."""
    if num_heads < world_size:
        raise InvalidConfig(
            f"tensor parallelism over {world_size} ranks needs at least {world_size} query heads; the model has "
            f"{num_heads} (with {num_kv_heads} KV heads)"
        )
    group = num_heads // num_kv_heads
    if num_kv_heads >= world_size:
        kv_start, kv_end = even_range(num_kv_heads, world_size, rank)
        return AttentionShard(kv_start * group, (kv_end - kv_start) * group, kv_start, kv_end - kv_start)
    # Fewer KV heads than ranks: rank r serves KV head r * kv // world (replicated on that head's
    # ranks); that head's query heads are split among its ranks. A head gets at most
    # ceil(world / kv) <= group ranks (num_heads >= world), so every rank gets a query head.
    kv = rank * num_kv_heads // world_size
    ranks = [r for r in range(world_size) if r * num_kv_heads // world_size == kv]
    q_start, q_end = even_range(group, len(ranks), ranks.index(rank))
    return AttentionShard(kv * group + q_start, q_end - q_start, kv, 1)


class ParallelContext:
    """This process's place in a tensor-parallel group. `group` None with world size 1: no
    collectives (every method is then the identity)."""

    def __init__(self, rank: int = 0, world_size: int = 1, group: Any = None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.group = group
        self.collective_seconds = 0.0  # time spent in all_reduce / gather_last_dim (benchmarks read it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def __repr__(self) -> str:
        return f"ParallelContext(rank={self.rank}, world_size={self.world_size})"

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (row-parallel outputs, vocab-parallel embeddings)."""
        if self.enabled:
            import torch.distributed as dist

            started = time.perf_counter()
            dist.all_reduce(t, group=self.group)
            self.collective_seconds += time.perf_counter() - started
        return t

    def gather_last_dim(self, t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Every rank's `t` [..., sizes[rank]] concatenated along the last dim, on every rank (ranks may
        hold different sizes: each pads to the largest for the collective)."""
        if not self.enabled:
            return t
        import torch.distributed as dist
        import torch.nn.functional as F

        widest = max(sizes)
        padded = F.pad(t, (0, widest - t.shape[-1])).contiguous()
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        started = time.perf_counter()
        dist.all_gather(parts, padded, group=self.group)
        self.collective_seconds += time.perf_counter() - started
        return torch.cat([p[..., :n] for p, n in zip(parts, sizes, strict=True)], dim=-1)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (picklable), in rank order (small things: KV slices, load outcomes)."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out


SINGLE = ParallelContext()
