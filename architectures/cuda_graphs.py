"""CUDA graphs for decode steps (one new token per sequence) of a paged model.

At Load, for each batch size of `graph_batch_sizes(limit)` (1, 2, 4, 8, ... up to the limit), one
decode step is captured over static buffers: tokens, positions, slot mapping [b], context lengths
[b], block tables [b, max_blocks]. A decode call of B sequences is padded to the next captured
size b: its inputs are copied into the first B rows, rows B..b are padding (token 0, position 0,
slot -1 so nothing is stored, context length 1 over block 0, whose key they read and discard),
the graph is replayed and the first B rows of the static logits are returned.

Only a backend whose kernels take every length from device tensors can be captured: the triton
backend, with its split count fixed (`TritonBackend.fixed_splits`) for captures and eager calls
alike, so that a replay computes exactly what an eager call of the same padded batch computes.
The capture never writes the KV cache (every slot is -1 while capturing).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .paged import PagedBatch, PagedKvCache

DEFAULT_MAX_GRAPH_BATCH = 64
WARMUP_RUNS = 2


def graph_batch_sizes(limit: int) -> list[int]:
    """Powers of two up to `limit`, and `limit` itself, so that every batch up to it has a size."""
    if limit < 1:
        return []
    sizes = []
    b = 1
    while b < limit:
        sizes.append(b)
        b *= 2
    sizes.append(limit)
    return sizes


def padded_size(batch: int, sizes: list[int]) -> int | None:
    """The smallest captured size that holds `batch` sequences (None: larger than every size)."""
    i = bisect.bisect_left(sizes, batch)
    return sizes[i] if i < len(sizes) else None


# Runs one decode step on a batch and returns logits [num_seqs, vocab] (float32).
DecodeStep = Callable[[PagedBatch], torch.Tensor]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    batch: PagedBatch  # over the static buffers (first `size` rows)
    logits: torch.Tensor  # static output [size, vocab]


class DecodeGraphs:
    """The captured decode steps of one model; `replay` runs a decode batch through one of them."""

    def __init__(self, cache: PagedKvCache, sizes: list[int], max_blocks: int) -> None:
        dev = cache.device
        top = sizes[-1]
        self.cache = cache
        self.sizes = sizes
        self.max_blocks = max_blocks
        self.tokens = torch.zeros(top, dtype=torch.long, device=dev)
        self.positions = torch.zeros(top, dtype=torch.long, device=dev)
        self.slots = torch.full((top,), -1, dtype=torch.long, device=dev)
        self.context_lens = torch.ones(top, dtype=torch.int32, device=dev)
        self.block_table = torch.zeros(top, max_blocks, dtype=torch.int32, device=dev)
        self.row_index = torch.arange(top, dtype=torch.long, device=dev)
        self.cu = torch.arange(top + 1, dtype=torch.int32, device=dev)
        self.graphs: dict[int, _Graph] = {}
        self.nbytes = 0

    @classmethod
    def capture(cls, cache: PagedKvCache, step: DecodeStep, limit: int, max_blocks: int) -> DecodeGraphs:
        """Capture `step` for every size (largest first, so smaller ones reuse its memory pool)."""
        sizes = graph_batch_sizes(limit)
        torch.cuda.synchronize(cache.device)
        free_before, _ = torch.cuda.mem_get_info(cache.device)
        graphs = cls(cache, sizes, max_blocks)
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(cache.device)
        for size in reversed(sizes):
            batch = graphs._static_batch(size)
            stream.wait_stream(torch.cuda.current_stream(cache.device))
            with torch.cuda.stream(stream):
                for _ in range(WARMUP_RUNS):  # compiles the kernels and settles the allocator
                    step(batch)
            torch.cuda.current_stream(cache.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = step(batch)
            graphs.graphs[size] = _Graph(graph, batch, logits)
        torch.cuda.synchronize(cache.device)
        free_after, _ = torch.cuda.mem_get_info(cache.device)
        graphs.nbytes = max(0, free_before - free_after)
        return graphs

    def _static_batch(self, size: int) -> PagedBatch:
        return PagedBatch(
            num_seqs=size,
            is_prefill=False,
            block_size=self.cache.block_size,
            query_lens=[1] * size,
            context_lens=[1] * size,
            block_tables=[[0]] * size,
            input_tokens=self.tokens[:size],
            positions=self.positions[:size],
            slot_mapping=self.slots[:size],
            store_slots=self.slots[:size],
            store_rows=None,
            last_token_indices=self.row_index[:size],
            block_table=self.block_table[:size],
            cu_query_lens=self.cu[: size + 1],
            cu_context_lens=self.cu[: size + 1],  # not read by the decode kernels
            context_lens_t=self.context_lens[:size],
            max_query_len=1,
            max_context_len=self.max_blocks * self.cache.block_size,
        )

    def can_replay(self, batch: PagedBatch) -> bool:
        return (
            batch.is_decode_only
            and batch.num_seqs <= self.sizes[-1]
            and batch.block_table.shape[1] <= self.max_blocks
        )

    def replay(self, batch: PagedBatch) -> torch.Tensor:
        """Logits [num_seqs, vocab] of a decode batch (checked with `can_replay`)."""
        n = batch.num_seqs
        size = padded_size(n, self.sizes)
        g = self.graphs[size]
        width = batch.block_table.shape[1]
        self.tokens[:n].copy_(batch.input_tokens)
        self.positions[:n].copy_(batch.positions)
        self.slots[:n].copy_(batch.slot_mapping)
        self.context_lens[:n].copy_(batch.context_lens_t)
        self.block_table[:n, :width].copy_(batch.block_table)
        if size > n:  # padding rows: nothing stored, one key of block 0 read
            self.tokens[n:size].zero_()
            self.positions[n:size].zero_()
            self.slots[n:size].fill_(-1)
            self.context_lens[n:size].fill_(1)
            self.block_table[n:size, 0].zero_()
        g.graph.replay()
        return g.logits[:n].clone()
