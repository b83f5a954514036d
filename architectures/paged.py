"""The paged KV cache of `forward_paged` (vLLM-style: the scheduler allocates blocks, the worker
executes), the validation of one call's batch, and the attention context over it.

Layout per layer: K and V of shape [num_blocks, block_size, num_kv_heads, head_dim]. Token i of a
sequence lives in block `block_table[i // block_size]` at offset `i % block_size`, that is at slot
`block_id * block_size + offset`; slot -1 means "do not store" (padding).

A call carries the new tokens of every sequence concatenated. The new tokens of a sequence are the
last `query_len` of its `context_len` tokens, so plain prefill (query_len == context_len), prefill
over a cached prefix (query_len < context_len), decode (query_len 1) and mixed batches are one case.
Causality and sliding windows are by index in the sequence: key j of a sequence has position j.

`prepare_paged_batch` checks everything before any tensor is written, so a rejected call leaves the
cache exactly as it was; `PagedContext.attend` then stores each layer's K/V with one vectorized op
and hands attention to the backend chosen at Load.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from registry.errors import InvalidArgument, InvalidRequest, OutOfResources

if TYPE_CHECKING:
    from .backends import AttentionBackend

IntsLike = torch.Tensor | Sequence[int]


class PagedKvCache:
    """K and V for every layer, allocated once at Load.

    `k[layer]` / `v[layer]` are views of one tensor per side, so the whole cache is two allocations
    and `reset` / `nbytes` are one op each; every view is contiguous (flash-attn needs a contiguous
    last dimension).
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        for name, value in (
            ("num_layers", num_layers),
            ("num_blocks", num_blocks),
            ("block_size", block_size),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgument(f"paged KV cache: {name} must be a positive integer, got {value!r}")
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        try:
            self._k = torch.zeros(shape, dtype=dtype, device=self.device)
            self._v = torch.zeros(shape, dtype=dtype, device=self.device)
        except (torch.cuda.OutOfMemoryError, MemoryError, RuntimeError) as exc:
            if isinstance(exc, RuntimeError) and not isinstance(exc, torch.cuda.OutOfMemoryError):
                if "can't allocate memory" not in str(exc):
                    raise
            self._k = self._v = None  # drop a half-made pair before the caller retries
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            need = 2 * torch.Size(shape).numel() * dtype.itemsize
            raise OutOfResources(
                f"paged KV cache of {num_blocks} blocks × {block_size} tokens × {num_layers} layers "
                f"({need} bytes) does not fit on {self.device}"
            ) from None
        self.k: list[torch.Tensor] = list(self._k.unbind(0))
        self.v: list[torch.Tensor] = list(self._v.unbind(0))

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        return 2 * self._k.numel() * self._k.element_size()

    def reset(self) -> None:
        self._k.zero_()
        self._v.zero_()

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of every layer: [num_layers, num_blocks, block_size, num_kv_heads, head_dim] each."""
        return self._k, self._v

    def flat_k(self, layer_idx: int) -> torch.Tensor:
        """Layer K as [num_slots, num_kv_heads, head_dim] (a view: slot-indexed reads and writes)."""
        return self.k[layer_idx].view(self.num_slots, self.num_kv_heads, self.head_dim)

    def flat_v(self, layer_idx: int) -> torch.Tensor:
        return self.v[layer_idx].view(self.num_slots, self.num_kv_heads, self.head_dim)


@dataclass(frozen=True)
class PagedBatch:
    """A validated call, with the index tensors every layer and backend reuses (on the cache's device).

    Host-side lists describe the sequences; device tensors are ready for embedding, RoPE, the K/V
    store and the attention kernels.
    """

    num_seqs: int
    is_prefill: bool
    block_size: int
    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    input_tokens: torch.Tensor  # LongTensor [num_tokens]
    positions: torch.Tensor  # LongTensor [num_tokens]
    slot_mapping: torch.Tensor  # LongTensor [num_tokens], -1 = skip
    # The K/V store: rows `store_rows` of this call's k/v go to `store_slots` (None: every row, in order).
    store_slots: torch.Tensor
    store_rows: torch.Tensor | None
    last_token_indices: torch.Tensor  # LongTensor [num_seqs]
    block_table: torch.Tensor  # int32 [num_seqs, max_blocks], padded with block 0
    cu_query_lens: torch.Tensor  # int32 [num_seqs + 1]
    cu_context_lens: torch.Tensor  # int32 [num_seqs + 1]
    context_lens_t: torch.Tensor  # int32 [num_seqs]
    max_query_len: int
    max_context_len: int

    @property
    def num_tokens(self) -> int:
        return int(self.input_tokens.shape[0])

    @property
    def is_decode_only(self) -> bool:
        """Every sequence adds exactly one token (whatever `is_prefill` said)."""
        return self.max_query_len == 1


def _as_int_list(values: Any, field: str) -> list[int]:
    if isinstance(values, torch.Tensor):
        if values.dtype.is_floating_point or values.dtype == torch.bool or values.dim() != 1:
            raise InvalidRequest(
                f"{field} must be a 1-D list of integers, got a {values.dtype} tensor "
                f"of shape {list(values.shape)}"
            )
        return [int(x) for x in values.tolist()]
    try:
        out = list(values)
    except TypeError:
        raise InvalidRequest(f"{field} must be a list of integers, got {type(values).__name__}") from None
    for i, x in enumerate(out):
        try:
            if isinstance(x, bool):
                raise TypeError
            out[i] = operator.index(x)  # int, NumPy integers, 0-d integer tensors
        except TypeError:
            raise InvalidRequest(f"{field}[{i}] must be an integer, got {x!r}") from None
    return out


def _as_long_1d(values: IntsLike, field: str) -> np.ndarray:
    """A host int64 copy for validation (one transfer when the caller's tensor is on a device).

    Validation runs in NumPy: on the handful of entries a decode step carries, each torch op costs
    several microseconds of dispatch, NumPy's about one.
    """
    if isinstance(values, torch.Tensor):
        t = values.detach()
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise InvalidRequest(f"{field} must hold integers, got {t.dtype}")
        if t.dim() != 1:
            raise InvalidRequest(
                f"{field} must be 1-D (all sequences' tokens concatenated), got shape {list(t.shape)}"
            )
        return t.to(device="cpu", dtype=torch.long).numpy()
    try:
        a = np.asarray(list(values))
    except (TypeError, ValueError, OverflowError):
        raise InvalidRequest(f"{field} must be a list of integers") from None
    if a.size and a.dtype.kind not in "iu":
        raise InvalidRequest(f"{field} must hold integers, got {a.dtype}")
    if a.ndim != 1:
        raise InvalidRequest(
            f"{field} must be 1-D (all sequences' tokens concatenated), got shape {list(a.shape)}"
        )
    if a.dtype.kind == "u" and a.size and int(a.max()) > np.iinfo(np.int64).max:
        raise InvalidRequest(f"{field} holds a value beyond int64")
    return a.astype(np.int64, copy=False)


def prepare_paged_batch(
    cache: PagedKvCache,
    input_tokens: IntsLike,
    positions: IntsLike,
    block_tables: Sequence[Sequence[int]],
    slot_mapping: IntsLike,
    context_lens: IntsLike,
    is_prefill: bool,
    query_lens: IntsLike | None = None,
    *,
    vocab_size: int,
    max_position_embeddings: int,
) -> PagedBatch:
    """Check one `forward_paged` call and build its index tensors. Writes nothing.

    Raises InvalidRequest naming the sequence and the field at fault, or OutOfResources when a
    sequence is longer than the whole cache.
    """
    bs = cache.block_size
    ctx = _as_int_list(context_lens, "context_lens")
    num_seqs = len(ctx)
    if num_seqs == 0:
        raise InvalidRequest("empty batch: context_lens has no sequence")
    if isinstance(block_tables, torch.Tensor):
        raise InvalidRequest("block_tables must be a list of per-sequence lists of block ids")
    try:
        tables = [_as_int_list(t, f"block_tables[{s}]") for s, t in enumerate(block_tables)]
    except TypeError:
        raise InvalidRequest("block_tables must be a list of per-sequence lists of block ids") from None
    if len(tables) != num_seqs:
        raise InvalidRequest(
            f"block_tables has {len(tables)} entries but context_lens has {num_seqs} sequences"
        )
    if query_lens is None or (not isinstance(query_lens, torch.Tensor) and len(query_lens) == 0):
        # The proto's default: the whole context is new for prefill, one token for decode.
        qlens = list(ctx) if is_prefill else [1] * num_seqs
    else:
        qlens = _as_int_list(query_lens, "query_lens")
        if len(qlens) != num_seqs:
            raise InvalidRequest(
                f"query_lens has {len(qlens)} entries but context_lens has {num_seqs} sequences"
            )

    # -- per sequence ---------------------------------------------------------------------------
    for s in range(num_seqs):
        c, q, table = ctx[s], qlens[s], tables[s]
        if c < 1:
            raise InvalidRequest(f"sequence {s}: context_len {c} must be at least 1")
        if c > cache.num_slots:
            raise OutOfResources(
                f"sequence {s}: context_len {c} exceeds the whole paged cache "
                f"({cache.num_blocks} blocks of {bs} tokens = {cache.num_slots})"
            )
        if c > len(table) * bs:
            raise InvalidRequest(
                f"sequence {s}: context_len {c} exceeds its {len(table)} blocks of {bs} tokens ({len(table) * bs})"
            )
        if table and (min(table) < 0 or max(table) >= cache.num_blocks):
            j, b = next((j, b) for j, b in enumerate(table) if not 0 <= b < cache.num_blocks)
            raise InvalidRequest(
                f"sequence {s}: block_tables[{s}][{j}] = {b} is outside [0, {cache.num_blocks})"
            )
        if len(set(table)) != len(table):
            seen: set[int] = set()
            dup = next(b for b in table if b in seen or seen.add(b))
            raise InvalidRequest(f"sequence {s}: block_tables[{s}] lists block {dup} more than once")
        if not is_prefill and q != 1:
            raise InvalidRequest(f"sequence {s}: query_len {q} in a decode call (is_prefill false) must be 1")
        if not 1 <= q <= c:
            raise InvalidRequest(f"sequence {s}: query_len {q} is outside [1, context_len {c}]")

    # -- per token: lengths first, so that every later message can name the sequence ------------
    num_tokens = sum(qlens)
    tokens = _as_long_1d(input_tokens, "input_tokens")
    pos = _as_long_1d(positions, "positions")
    slots = _as_long_1d(slot_mapping, "slot_mapping")
    for field, t in (("input_tokens", tokens), ("positions", pos), ("slot_mapping", slots)):
        if t.size != num_tokens:
            raise InvalidRequest(
                f"{field} has {t.size} entries but the sequences' query_lens add up to {num_tokens}"
            )
    qlens_a = np.asarray(qlens, dtype=np.int64)
    ctx_a = np.asarray(ctx, dtype=np.int64)
    seq_of_token = np.repeat(np.arange(num_seqs), qlens_a)
    cu_q = np.zeros(num_seqs + 1, dtype=np.int64)
    np.cumsum(qlens_a, out=cu_q[1:])
    # Index of each new token inside its sequence: the last query_len of context_len.
    seq_index = (ctx_a - qlens_a)[seq_of_token] + np.arange(num_tokens) - cu_q[:-1][seq_of_token]

    def fail_at(bad: np.ndarray, field: str, values: np.ndarray, what: str) -> None:
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            s = int(seq_of_token[i])
            raise InvalidRequest(
                f"sequence {s}: {field}[{i}] = {int(values[i])} (token {int(seq_index[i])} of the sequence) {what}"
            )

    fail_at(
        (tokens < 0) | (tokens >= vocab_size),
        "input_tokens",
        tokens,
        f"is outside the vocabulary [0, {vocab_size})",
    )
    fail_at(
        (pos < 0) | (pos >= max_position_embeddings),
        "positions",
        pos,
        f"is outside [0, max_position_embeddings {max_position_embeddings})",
    )
    fail_at(
        (slots < -1) | (slots >= cache.num_slots),
        "slot_mapping",
        slots,
        f"is outside [-1, {cache.num_slots})",
    )

    stored = slots >= 0
    stored_index = np.flatnonzero(stored)
    stored_slots = slots[stored_index]
    order = np.argsort(stored_slots, kind="stable")
    sorted_slots = stored_slots[order]
    dups = np.flatnonzero(sorted_slots[1:] == sorted_slots[:-1])
    if dups.size:
        first_dup = int(dups[0])
        a, b = (int(i) for i in stored_index[order[first_dup : first_dup + 2]])
        raise InvalidRequest(
            f"sequence {int(seq_of_token[b])}: slot_mapping[{b}] = {int(slots[b])} repeats the slot of "
            f"slot_mapping[{a}] (sequence {int(seq_of_token[a])}); each slot can be written once per call"
        )

    # A slot must be where the sequence's block table puts that token: a mismatch would write into
    # (and corrupt) another sequence's blocks while this one attends over stale data.
    max_blocks = max(len(t) for t in tables)
    table_a = np.zeros((num_seqs, max_blocks), dtype=np.int64)
    for s, t in enumerate(tables):
        table_a[s, : len(t)] = t
    expected = table_a[seq_of_token, seq_index // bs] * bs + seq_index % bs
    wrong = stored & (slots != expected)
    if wrong.any():
        i = int(np.flatnonzero(wrong)[0])
        s, j = int(seq_of_token[i]), int(seq_index[i])
        raise InvalidRequest(
            f"sequence {s}: slot_mapping[{i}] = {int(slots[i])} but token {j} of the sequence belongs in "
            f"block {tables[s][j // bs]} at offset {j % bs} (slot {int(expected[i])}) or -1"
        )

    # -- device tensors, built once per call and shared by every layer ---------------------------
    # Two host-to-device copies in all (one per dtype) rather than one per tensor.
    cu_ctx = np.zeros(num_seqs + 1, dtype=np.int64)
    np.cumsum(ctx_a, out=cu_ctx[1:])
    all_stored = stored_index.size == num_tokens
    dev = cache.device
    tokens_d, pos_d, slots_d, store_slots_d, store_rows_d, last_d = _to_device(
        dev, torch.long, [tokens, pos, slots, stored_slots, stored_index, cu_q[1:] - 1]
    )
    table_d, cu_q_d, cu_ctx_d, ctx_d = _to_device(dev, torch.int32, [table_a, cu_q, cu_ctx, ctx_a])
    return PagedBatch(
        num_seqs=num_seqs,
        is_prefill=bool(is_prefill),
        block_size=bs,
        query_lens=qlens,
        context_lens=ctx,
        block_tables=tables,
        input_tokens=tokens_d,
        positions=pos_d,
        slot_mapping=slots_d,
        store_slots=store_slots_d,
        store_rows=None if all_stored else store_rows_d,
        last_token_indices=last_d,
        block_table=table_d,
        cu_query_lens=cu_q_d,
        cu_context_lens=cu_ctx_d,
        context_lens_t=ctx_d,
        max_query_len=max(qlens),
        max_context_len=max(ctx),
    )


def _to_device(device: torch.device, dtype: torch.dtype, parts: list[np.ndarray]) -> list[torch.Tensor]:
    """`parts` converted to `dtype` on `device`, through one copy: contiguous views of one buffer."""
    flat = torch.from_numpy(np.concatenate([p.reshape(-1) for p in parts])).to(device=device, dtype=dtype)
    out, offset = [], 0
    for p in parts:
        out.append(flat[offset : offset + p.size].view(p.shape))
        offset += p.size
    return out


class PagedContext:
    """The attention context of one `forward_paged` call (see architectures/attention.py).

    q [num_tokens, n_heads, head_dim], k/v [num_tokens, n_kv_heads, head_dim] → [num_tokens,
    n_heads, head_dim]. Each layer first stores its K/V at the batch's slots, then attends through
    the backend, which reads every key (the new ones included) from the cache.
    """

    def __init__(self, cache: PagedKvCache, batch: PagedBatch, backend: AttentionBackend) -> None:
        if batch.block_size != cache.block_size:
            raise ValueError("the batch was prepared for a cache with another block size")
        self.cache = cache
        self.batch = batch
        self.backend = backend
        self.plan = backend.plan(cache, batch)  # per-call metadata reused by every layer

    def store(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """One indexed copy per side for the whole batch (no loop over tokens)."""
        b = self.batch
        k_flat, v_flat = self.cache.flat_k(layer_idx), self.cache.flat_v(layer_idx)
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
        return self.backend.attend(self.cache, layer_idx, q, self.batch, self.plan, window, scale)
