"""Megatron-style sharded layers. Each declares `checkpoint_slices` (parameter → the part of the
checkpoint tensor this rank reads, one `TensorSlice` per fused shard), so the safetensors loader
reads only this rank's rows or columns; parameter names stay those of the unsharded layers.

- column-parallel (`column_parallel_fused`): output rows split (q/k/v by KV groups, gate/up by
  intermediate rows); no communication.
- row-parallel (`RowParallelLinear`): input columns split; partial outputs all-reduced, the bias
  (whole on every rank) added once after the sum.
- vocab-parallel (`VocabParallelEmbedding`, `ParallelLMHead`): vocabulary rows split; the
  embedding all-reduces (each token's row lives on one rank), the head gathers every rank's logits.
- mixture of experts (`sharded_moe_block`): every expert's intermediate rows split (gate/up
  column-parallel, down row-parallel), the shared expert likewise, router replicated; one
  all-reduce per block.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from registry.errors import InvalidConfig
from registry.parallel import ParallelContext, TensorSlice, even_range

from .cpu_gemm import Linear
from .layers import FusedLinear
from .moe import MoeSpec, SparseMoeBlock


def column_parallel_fused(
    in_features: int,
    full_sizes: tuple[int, ...],
    ranges: tuple[tuple[int, int], ...],
    bias: bool,
) -> FusedLinear:
    """A FusedLinear holding rows [start, start + length) of each fused part (full sizes
    `full_sizes`); `ranges` gives (start, length) per part."""
    layer = FusedLinear(in_features, tuple(length for _, length in ranges), bias=bias)
    slices = tuple(
        TensorSlice(0, start, length, full) for (start, length), full in zip(ranges, full_sizes, strict=True)
    )
    layer.checkpoint_slices = {"weight": slices, "bias": slices}
    return layer


class RowParallelLinear(Linear):
    """y = all_reduce(x_local @ W[:, cols]ᵀ) + b: x_local [..., length] holds input features
    [start, start + length) of `full_in`; W is [out, length] here, [out, full_in] in the checkpoint."""

    def __init__(
        self, full_in: int, start: int, length: int, out_features: int, bias: bool, parallel: ParallelContext
    ) -> None:
        super().__init__(length, out_features, bias=bias)
        self.parallel = parallel
        self.checkpoint_slices = {"weight": (TensorSlice(1, start, length, full_in),)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.parallel.all_reduce(self.gemm(x, self.weight))
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Embedding):
    """Rows [start, end) of the embedding table; a token outside them contributes zeros, and the sum
    over ranks gives every token its row."""

    def __init__(self, vocab_size: int, hidden: int, parallel: ParallelContext) -> None:
        self.start, self.end = even_range(vocab_size, parallel.world_size, parallel.rank)
        super().__init__(self.end - self.start, hidden)
        self.parallel = parallel
        self.checkpoint_slices = {"weight": (TensorSlice(0, self.start, self.end - self.start, vocab_size),)}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.end - self.start)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0)
        return self.parallel.all_reduce(out)


class ParallelLMHead(Linear):
    """Vocabulary rows [start, end) of lm_head; forward gathers every rank's logits (ranks may hold
    different numbers of rows) into [..., vocab]."""

    def __init__(self, hidden: int, vocab_size: int, parallel: ParallelContext) -> None:
        start, end = even_range(vocab_size, parallel.world_size, parallel.rank)
        super().__init__(hidden, end - start, bias=False)
        self.parallel = parallel
        self.sizes = [
            b - a
            for a, b in (even_range(vocab_size, parallel.world_size, r) for r in range(parallel.world_size))
        ]
        self.checkpoint_slices = {"weight": (TensorSlice(0, start, end - start, vocab_size),)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.parallel.gather_last_dim(self.gemm(x, self.weight), self.sizes)


def sharded_moe_block(
    hidden: int, act: str, spec: MoeSpec, architecture: str, parallel: ParallelContext
) -> SparseMoeBlock:
    """This rank's part of a sparse MoE block: rows [r * I / N, (r + 1) * I / N) of every expert's
    gate and up, the same columns of its down (and of the shared expert's); the router and the
    shared expert's gate are replicated. Routing is then the same on every rank, each rank's output
    is a partial sum, and the block all-reduces it once. The intermediate sizes must divide by the
    number of ranks (every expert is cut the same way): InvalidConfig otherwise."""
    world, rank = parallel.world_size, parallel.rank
    sizes = {spec.intermediate_field: spec.intermediate_size}
    if spec.shared_expert_intermediate_size:
        sizes["shared_expert_intermediate_size"] = spec.shared_expert_intermediate_size
    uneven = [f"{field} {size}" for field, size in sizes.items() if size % world]
    if uneven:
        raise InvalidConfig(
            f"{architecture} (mixture of experts): {' and '.join(uneven)} "
            f"{'does' if len(uneven) == 1 else 'do'} not divide over {world} "
            f"tensor-parallel ranks (each expert's intermediate rows are split evenly); use a "
            f"tensor_parallel_size that divides {'it' if len(uneven) == 1 else 'them'}"
        )
    local = replace(
        spec,
        intermediate_size=spec.intermediate_size // world,
        shared_expert_intermediate_size=spec.shared_expert_intermediate_size // world,
    )
    block = SparseMoeBlock(hidden, act, local)

    def cut(full: int, dim: int) -> TensorSlice:
        return TensorSlice(dim, rank * (full // world), full // world, full)

    rows, cols = cut(spec.intermediate_size, 0), cut(spec.intermediate_size, 1)
    block.experts.checkpoint_slices = {"gate_up_proj": (rows, rows), "down_proj": (cols,)}
    if block.has_shared_expert:
        full = spec.shared_expert_intermediate_size
        block.shared_expert.gate_up_proj.checkpoint_slices = {"weight": (cut(full, 0), cut(full, 0))}
        block.shared_expert.down_proj.checkpoint_slices = {"weight": (cut(full, 1),)}
    block.parallel = parallel
    return block
