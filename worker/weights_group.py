"""A torch.distributed group between a trainer (rank 0) and the worker, for weight broadcasts.

The group is made beside any default group, never as one: the worker (and a trainer that already
runs its own training group) keeps `torch.distributed`'s global state for itself. The construction
is the one SGLang's `init_custom_process_group` and OpenRLHF use: a TCP rendezvous at
`tcp://master_address:master_port` (rank 0 hosts the store), the store prefixed with the group's
name, and a gloo (CPU) or NCCL (CUDA) process group over it. A trainer joins the same group with
`WeightsGroup.join(..., rank=0)` and calls `broadcast` once per tensor, in the order it announced.

Every call blocks (rendezvous, collectives); the worker runs them on the group's own thread.
"""

from __future__ import annotations

import datetime as dt
import re

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

GROUP_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
BACKENDS = ("gloo", "nccl")


class WeightsGroup:
    def __init__(self, group: dist.ProcessGroup, name: str, rank: int, world_size: int, backend: str) -> None:
        self.group = group
        self.name = name
        self.rank = rank
        self.world_size = world_size
        self.backend = backend

    @classmethod
    def join(
        cls,
        master_address: str,
        master_port: int,
        world_size: int,
        rank: int,
        group_name: str,
        backend: str = "gloo",
        timeout_seconds: float = 60.0,
    ) -> WeightsGroup:
        """Join (rank 0: host) the group; returns once all `world_size` ranks are in."""
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
        timeout = dt.timedelta(seconds=timeout_seconds)
        url = f"tcp://{master_address}:{master_port}"
        store, rank, world_size = next(dist.rendezvous(url, rank, world_size, timeout=timeout))
        store.set_timeout(timeout)
        group, _ = c10d._new_process_group_helper(
            world_size,
            rank,
            [],
            backend,
            dist.PrefixStore(group_name, store),
            group_name=group_name,
            timeout=timeout,
            group_desc=f"weights:{group_name}",
        )
        # Ranks of this group are its own (0..world_size-1), not those of any default group.
        c10d._world.pg_group_ranks[group] = {i: i for i in range(world_size)}
        return cls(group, group_name, rank, world_size, backend)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        """Rank `src` sends `tensor`; every other rank receives into it (same shape and dtype)."""
        dist.broadcast(tensor, src=src, group=self.group)

    def destroy(self) -> None:
        dist.destroy_process_group(self.group)


__all__ = ["BACKENDS", "GROUP_NAME", "WeightsGroup"]
