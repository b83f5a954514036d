"""ExportKvBlocks and ImportKvBlocks (DESIGN.md "KV block transfer"): paged KV blocks as raw tensor
bytes, chunked under the message cap.

Export copies K and V of the named blocks to host memory under the model's lock (one consistent
snapshot; forwards wait only for the copy, not for the network), then streams it: chunks of whole
layers while a layer of every block fits, else one layer of a run of blocks. The first chunk carries
the layout.

Import collects the whole stream into host buffers sized by the first chunk (at most the model's cache:
the destination ids are checked before anything else is read), checks every chunk as it arrives and
writes into the cache, under the model's lock, only once every layer of every block arrived exactly
once. A stream that ends early, is cancelled or carries one bad chunk writes nothing.

Chunk `block_ids` are the exporter's block ids; the i-th distinct one in the stream goes to
`dst_block_ids[i]` (the exporter sends them in its request's order).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import numpy as np
import torch

from registry import KvLayout, Model
from registry.errors import FailedPrecondition, IncompatibleLayout, InvalidArgument, OutOfResources
from registry.registry import validate_model_id

from .pb.modelworker.v1 import worker_pb2 as pb
from .status import note
from .tensors import TORCH_TO_ENUM, encode_tensor

if TYPE_CHECKING:
    from .servicer import ModelWorkerServicer

# A chunk's payload aims at this size and stays under the message cap. Small chunks pipeline the copy
# with the sending and reuse warm memory: on the 2-core VM 0.5-1 MiB chunks export about twice as fast
# as 4 MiB ones, and 32 MiB ones at a third of the speed.
CHUNK_TARGET_BYTES = 1024 * 1024
# Room in a message for its fields besides the two tensors' data (block ids, shapes, layout).
_FRAMING_BYTES = 4096


@dataclass(frozen=True)
class ChunkPlan:
    """Layers [layer_start, layer_end) of the exported blocks [block_start, block_end) (list positions)."""

    layer_start: int
    layer_end: int
    block_start: int
    block_end: int


def plan_chunks(layout: KvLayout, num_blocks: int, max_message_bytes: int) -> list[ChunkPlan]:
    """Chunks of whole layers when one layer of every block fits, else one layer of as many blocks as fit."""
    budget = min(CHUNK_TARGET_BYTES, max_message_bytes - _FRAMING_BYTES - 6 * num_blocks)
    per_block = layout.layer_block_bytes  # one layer of one block, K and V
    if per_block > budget:
        raise OutOfResources(
            f"one layer of one block takes {per_block} bytes (K and V), over the {budget} a message of "
            f"max_message_bytes {max_message_bytes} can carry for {num_blocks} blocks; raise --max-message-bytes"
        )
    layers = layout.num_layers
    per_layer = per_block * num_blocks
    if per_layer <= budget:
        step = budget // per_layer
        return [ChunkPlan(l0, min(l0 + step, layers), 0, num_blocks) for l0 in range(0, layers, step)]
    step = budget // per_block
    return [
        ChunkPlan(layer, layer + 1, b0, min(b0 + step, num_blocks))
        for layer in range(layers)
        for b0 in range(0, num_blocks, step)
    ]


def layout_to_pb(layout: KvLayout) -> pb.KvLayout:
    return pb.KvLayout(
        num_layers=layout.num_layers,
        block_size=layout.block_size,
        num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim,
        dtype=TORCH_TO_ENUM[layout.dtype],
    )


def layout_differences(theirs: pb.KvLayout, ours: KvLayout) -> list[str]:
    """`field sent vs loaded` for every field of the sent layout that differs from the model's."""
    mine = layout_to_pb(ours)
    out = []
    for name in ("num_layers", "block_size", "num_kv_heads", "head_dim"):
        if getattr(theirs, name) != getattr(mine, name):
            out.append(f"{name} {getattr(theirs, name)} vs {getattr(mine, name)}")
    if theirs.dtype != mine.dtype:
        sent = pb.DType.Name(theirs.dtype) if theirs.dtype in pb.DType.values() else str(theirs.dtype)
        out.append(f"dtype {sent} vs {pb.DType.Name(mine.dtype)}")
    return out


def _numpy_view(t: torch.Tensor) -> np.ndarray:
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def _paged_layout(model: Model, *, model_id: str) -> tuple[KvLayout, int]:
    layout = model.kv_layout
    if layout is None:
        raise FailedPrecondition(f"model {model_id!r} has no paged KV cache to transfer blocks of")
    return layout, model.cache_spec.num_blocks


# -- export ----------------------------------------------------------------------------------------
async def export_blocks(
    servicer: ModelWorkerServicer, request: pb.ExportKvBlocksRequest, context: grpc.aio.ServicerContext
) -> None:
    model_id = validate_model_id(request.model_id)
    ids = list(request.block_ids)
    started = time.perf_counter()

    def snapshot(model: Model) -> tuple[KvLayout, list[ChunkPlan], torch.Tensor, torch.Tensor]:
        layout, _ = _paged_layout(model, model_id=model_id)
        key, value = model.export_kv_blocks(ids)  # checks the ids first; host copies
        return layout, plan_chunks(layout, len(ids), servicer.settings.max_message_bytes), key, value

    layout, plan, key, value = await servicer._on_model(model_id, snapshot)

    def encode(i: int, part: ChunkPlan) -> pb.KvBlocksChunk:
        layers = slice(part.layer_start, part.layer_end)
        blocks = slice(part.block_start, part.block_end)
        chunk = pb.KvBlocksChunk(
            layer_start=part.layer_start, layer_end=part.layer_end, block_ids=ids[blocks]
        )
        if i == 0:
            chunk.layout.CopyFrom(layout_to_pb(layout))
        encode_tensor(key[layers, blocks], chunk.key)  # a contiguous view: one copy into bytes
        encode_tensor(value[layers, blocks], chunk.value)
        return chunk

    sent = 0
    for i, part in enumerate(plan):
        # Megabytes of copying per chunk: in a thread, so the event loop keeps answering other calls.
        chunk = await servicer._in_thread(functools.partial(encode, i, part))
        sent += (
            (part.layer_end - part.layer_start)
            * (part.block_end - part.block_start)
            * layout.layer_block_bytes
        )
        await context.write(chunk)
    note(blocks=len(ids), bytes=sent, chunks=len(plan))
    servicer.observer.kv_transferred(model_id, "export", sent, time.perf_counter() - started)


# -- import ----------------------------------------------------------------------------------------
def check_ids(ids: list[int], num_blocks: int, field: str) -> None:
    if not ids:
        raise InvalidArgument(
            f"{field} is empty: the first chunk names one destination block per exported block"
        )
    if len(ids) > num_blocks:
        raise InvalidArgument(f"{field} lists {len(ids)} blocks; the model's cache has {num_blocks}")
    seen: set[int] = set()
    for i, b in enumerate(ids):
        if not 0 <= b < num_blocks:
            raise InvalidArgument(f"{field}[{i}] = {b} is outside [0, {num_blocks})")
        if b in seen:
            raise InvalidArgument(f"{field}[{i}] = {b} lists block {b} more than once")
        seen.add(b)


class KvAssembly:
    """The blocks of one import stream in host memory, and which (layer, block) pairs have arrived."""

    def __init__(self, layout: KvLayout, dst_block_ids: list[int]) -> None:
        self.layout = layout
        self.dst_block_ids = dst_block_ids
        n = len(dst_block_ids)
        shape = (layout.num_layers, n, layout.block_size, layout.num_kv_heads, layout.head_dim)
        self.key = torch.empty(shape, dtype=layout.dtype)
        self.value = torch.empty(shape, dtype=layout.dtype)
        # numpy views of both (bfloat16 as int16): chunks are copied in straight from their bytes.
        self._arrays = [_numpy_view(self.key), _numpy_view(self.value)]
        self._wire = np.dtype(self._arrays[0].dtype).newbyteorder("<")
        self.covered = torch.zeros((layout.num_layers, n), dtype=torch.bool)
        self.position: dict[int, int] = {}  # exporter's block id → index into dst_block_ids
        self.source: list[int] = []
        self.chunks = 0
        self.bytes = 0

    def add(self, chunk: pb.KvBlocksChunk) -> None:
        where = f"chunk {self.chunks}"
        lay = self.layout
        l0, l1 = chunk.layer_start, chunk.layer_end
        if not 0 <= l0 < l1 <= lay.num_layers:
            raise InvalidArgument(
                f"{where}: layers [{l0}, {l1}) are not a non-empty range inside [0, {lay.num_layers})"
            )
        if not chunk.block_ids:
            raise InvalidArgument(f"{where}: block_ids is empty")
        if len(set(chunk.block_ids)) != len(chunk.block_ids):
            raise InvalidArgument(f"{where}: block_ids lists a block more than once")
        positions = []
        for b in chunk.block_ids:
            if b not in self.position:
                if len(self.source) == len(self.dst_block_ids):
                    raise InvalidArgument(
                        f"{where}: block {b} is one more exported block than the {len(self.dst_block_ids)} "
                        "dst_block_ids"
                    )
                self.position[b] = len(self.source)
                self.source.append(b)
            positions.append(self.position[b])
        want = [l1 - l0, len(positions), lay.block_size, lay.num_kv_heads, lay.head_dim]
        dtype = TORCH_TO_ENUM[lay.dtype]
        need = math.prod(want) * lay.dtype.itemsize
        raws = []
        for name in ("key", "value"):
            msg = getattr(chunk, name)
            if msg.dtype != dtype:
                got = pb.DType.Name(msg.dtype) if msg.dtype in pb.DType.values() else str(msg.dtype)
                raise InvalidArgument(f"{where}: {name} is {got}; the layout says {pb.DType.Name(dtype)}")
            if list(msg.shape) != want:
                raise InvalidArgument(f"{where}: {name} has shape {list(msg.shape)}, expected {want}")
            raw = msg.data
            if len(raw) != need:
                raise InvalidArgument(f"{where}: {name} of shape {want} needs {need} bytes, got {len(raw)}")
            raws.append(raw)
        index = torch.tensor(positions, dtype=torch.long)
        seen = self.covered[l0:l1].index_select(1, index)
        if bool(seen.any()):
            layer, j = (int(x) for x in seen.nonzero()[0])
            raise InvalidArgument(f"{where}: layer {l0 + layer} of block {chunk.block_ids[j]} arrived twice")
        # A run of positions (as exported) is a slice: one copy from the message's bytes, no gather.
        first = positions[0]
        where_to = (
            slice(first, first + len(positions))
            if positions == list(range(first, first + len(positions)))
            else positions
        )
        for array, raw in zip(self._arrays, raws, strict=True):
            array[l0:l1, where_to] = np.frombuffer(raw, dtype=self._wire).reshape(want)
        self.covered[l0:l1, index] = True
        self.chunks += 1
        self.bytes += 2 * need

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.dst_block_ids)
        if len(self.source) != n:
            raise InvalidArgument(
                f"the stream carried {len(self.source)} blocks for {n} dst_block_ids (ended early, or the "
                "counts differ)"
            )
        missing = (~self.covered).nonzero()
        if missing.numel():
            layer, j = (int(x) for x in missing[0])
            raise InvalidArgument(
                f"layer {layer} of block {self.source[j]} (for dst block {self.dst_block_ids[j]}) never "
                f"arrived ({int(missing.shape[0])} layer-blocks missing; the stream ended early)"
            )
        return self.key, self.value


async def _start_import(servicer: ModelWorkerServicer, first: pb.KvBlocksChunk) -> tuple[str, KvAssembly]:
    """The model and the host buffers of an import, from its first chunk (layout and ids checked)."""
    model_id = validate_model_id(first.model_id)
    note(import_model=model_id)
    layout, num_blocks = await servicer._on_model(
        model_id, functools.partial(_paged_layout, model_id=model_id)
    )
    if not first.HasField("layout"):
        raise InvalidArgument("the first chunk must carry the exporter's layout")
    differences = layout_differences(first.layout, layout)
    if differences:
        raise IncompatibleLayout(
            f"the blocks' layout does not match model {model_id!r} (sent vs loaded: {'; '.join(differences)})"
        )
    dst = list(first.dst_block_ids)
    check_ids(dst, num_blocks, "dst_block_ids")
    return model_id, KvAssembly(layout, dst)


async def import_blocks(
    servicer: ModelWorkerServicer, chunks: AsyncIterator[pb.KvBlocksChunk], context: grpc.aio.ServicerContext
) -> pb.ImportKvBlocksResponse:
    started = time.perf_counter()
    assembly: KvAssembly | None = None
    model_id = ""
    async for chunk in chunks:
        if assembly is None:
            model_id, assembly = await _start_import(servicer, chunk)
        elif chunk.model_id or chunk.dst_block_ids:
            raise InvalidArgument(
                f"chunk {assembly.chunks}: only the first chunk names model_id and dst_block_ids"
            )
        elif chunk.HasField("layout") and layout_differences(chunk.layout, assembly.layout):
            raise InvalidArgument(f"chunk {assembly.chunks}: its layout differs from the first chunk's")
        await servicer._in_thread(functools.partial(assembly.add, chunk))  # copies: off the event loop
    if assembly is None:
        raise InvalidArgument("the stream carried no chunk")
    key, value = assembly.finish()
    dst = assembly.dst_block_ids
    await servicer._on_model(model_id, lambda m: m.import_kv_blocks(dst, key, value))
    note(blocks=len(dst), bytes=assembly.bytes, chunks=assembly.chunks)
    servicer.observer.kv_transferred(model_id, "import", assembly.bytes, time.perf_counter() - started)
    return pb.ImportKvBlocksResponse(blocks=len(dst), bytes=assembly.bytes)


__all__ = ["ChunkPlan", "KvAssembly", "export_blocks", "import_blocks", "plan_chunks"]
