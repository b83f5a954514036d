"""The paged KV cache of `forward_paged` (vLLM-style: the scheduler allocates blocks, the worker
executes) and the validation of one call's batch into a `PagedBatch`. Backends and the attention
context (architectures/paged.py) both import this module; it imports neither.

Layout per layer: K and V of shape [num_blocks, block_size, num_kv_heads, head_dim]. Token i of a
sequence lives in block `block_table[i // block_size]` at offset `i % block_size`, that is at slot
`block_id * block_size + offset`; slot -1 means "do not store" (padding).

A call carries the new tokens of every sequence concatenated. The new tokens of a sequence are the
last `query_len` of its `context_len` tokens, so plain prefill (query_len == context_len), prefill
over a cached prefix (query_len < context_len), decode (query_len 1) and mixed batches are one case.
Causality and sliding windows are by index in the sequence: key j of a sequence has position j.

`prepare_paged_batch` checks everything before any tensor is written, so a rejected call leaves the
cache exactly as it was. It is a sequence of small named checks (`check_sequence`,
`check_token_count`, `_TokenIndex.check_range`, `check_unique_slots`, `check_slots_match_tables`);
the ones that need no cache (`registry.paged_checks`) are shared with the worker.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from registry.errors import InvalidArgument, InvalidRequest, OutOfResources
from registry.paged_checks import check_token_count, resolve_query_lens

from .lazy_zeros import zeros as lazy_zeros

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
            self._k = lazy_zeros(shape, dtype, self.device)
            self._v = lazy_zeros(shape, dtype, self.device)
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


def _as_int_list(values: object, field: str) -> list[int]:
    if isinstance(values, torch.Tensor):
        if values.dtype.is_floating_point or values.dtype == torch.bool or values.dim() != 1:
            raise InvalidRequest(
                f"{field} must be a 1-D list of integers, got a {values.dtype} tensor "
                f"of shape {list(values.shape)}"
            )
        return [int(x) for x in values.tolist()]
    try:
        out = list(values)  # type: ignore[call-overload]
    except TypeError:
        raise InvalidRequest(f"{field} must be a list of integers, got {type(values).__name__}") from None
    if all(type(x) is int for x in out):  # the usual case (bool is not int here): nothing to convert
        return out
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
    sequence is longer than the whole cache. The checks run in this order: the sequences (lists
    and their lengths), each sequence against the cache, then every token.
    """
    if not is_prefill:
        fast = _plain_decode_batch(
            cache, input_tokens, positions, block_tables, slot_mapping, context_lens, query_lens,
            vocab_size, max_position_embeddings,
        )  # fmt: skip
        if fast is not None:
            return fast
    ctx, tables, qlens, defaulted = _sequence_lists(context_lens, block_tables, query_lens, is_prefill)
    for s in range(len(ctx)):
        check_sequence(cache, s, ctx[s], qlens[s], tables[s], is_prefill)
    # Lengths first, so that every later message can name the sequence.
    tokens = _as_long_1d(input_tokens, "input_tokens")
    pos = _as_long_1d(positions, "positions")
    slots = _as_long_1d(slot_mapping, "slot_mapping")
    for field, t in (("input_tokens", tokens), ("positions", pos), ("slot_mapping", slots)):
        check_token_count(field, t.size, qlens, defaulted)
    index = _TokenIndex.of(ctx, qlens)
    index.check_range("input_tokens", tokens, 0, vocab_size, f"is outside the vocabulary [0, {vocab_size})")
    index.check_range(
        "positions",
        pos,
        0,
        max_position_embeddings,
        f"is outside [0, max_position_embeddings {max_position_embeddings})",
    )
    index.check_range("slot_mapping", slots, -1, cache.num_slots, f"is outside [-1, {cache.num_slots})")
    stored_index = np.flatnonzero(slots >= 0)
    check_unique_slots(index, slots, stored_index)
    table_a = _table_array(tables)
    check_slots_match_tables(index, slots, tables, table_a, cache.block_size)
    return _build_batch(
        cache, is_prefill, ctx, qlens, tables, table_a, tokens, pos, slots, stored_index, index
    )


# A decode call of up to this many sequences is checked in plain Python first (below).
PLAIN_DECODE_SEQS = 16
INT32_MAX = (1 << 31) - 1  # cumulative context offsets are int32 (cu_context_lens)


def _plain_ints(values: object) -> list[int] | None:
    """`values` as Python ints when it is a list of ints or a 1-D integer tensor, else None."""
    if isinstance(values, torch.Tensor):
        dtype = values.dtype
        if values.dim() != 1 or dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
            return None
        return values.tolist()
    if type(values) is list and all(type(x) is int for x in values):
        return list(values)  # the batch keeps its own lists, as the general path's
    return None


def _plain_decode_batch(
    cache: PagedKvCache,
    input_tokens: IntsLike,
    positions: IntsLike,
    block_tables: Sequence[Sequence[int]],
    slot_mapping: IntsLike,
    context_lens: IntsLike,
    query_lens: IntsLike | None,
    vocab_size: int,
    max_position_embeddings: int,
) -> PagedBatch | None:
    """The batch of a valid decode call of at most PLAIN_DECODE_SEQS sequences, checked in plain
    Python: on a step's handful of integers the general path's NumPy calls cost more than the checks
    (185 µs of a tiny model's ~0.9 ms call, with the caches another model's step left). It accepts
    exactly what the general path accepts and returns None for anything else (an unusual type, a
    value at fault): the general path then checks the call and names the fault."""
    ctx = _plain_ints(context_lens)
    tokens, pos, slots = _plain_ints(input_tokens), _plain_ints(positions), _plain_ints(slot_mapping)
    if ctx is None or tokens is None or pos is None or slots is None or type(block_tables) is not list:
        return None
    n = len(ctx)
    if not 0 < n <= PLAIN_DECODE_SEQS or not len(tokens) == len(pos) == len(slots) == len(block_tables) == n:
        return None
    if query_lens is not None and _plain_ints(query_lens) not in ([], [1] * n):  # [] = the default
        return None
    bs, num_blocks = cache.block_size, cache.num_blocks
    tables: list[list[int]] = []
    for s in range(n):
        table, c, slot = _plain_ints(block_tables[s]), ctx[s], slots[s]
        if table is None or not 1 <= c <= min(len(table) * bs, cache.num_slots):
            return None
        if min(table) < 0 or max(table) >= num_blocks or len(set(table)) != len(table):
            return None
        if not (0 <= tokens[s] < vocab_size and 0 <= pos[s] < max_position_embeddings):
            return None
        if slot != -1 and slot != table[(c - 1) // bs] * bs + (c - 1) % bs:  # also its range check
            return None
        tables.append(table)
    stored = [i for i in range(n) if slots[i] >= 0]
    if len({slots[i] for i in stored}) != len(stored):
        return None
    width = max(len(t) for t in tables)
    cu_ctx = [0]
    for c in ctx:
        cu_ctx.append(cu_ctx[-1] + c)
    if cu_ctx[-1] > INT32_MAX:
        return None
    return _assemble(
        cache,
        False,
        ctx,
        [1] * n,
        tables,
        [tokens, pos, slots, [slots[i] for i in stored], stored, range(n)],
        [[t + [0] * (width - len(t)) for t in tables], range(n + 1), cu_ctx, ctx],
        all_stored=len(stored) == n,
    )


def _sequence_lists(
    context_lens: IntsLike,
    block_tables: Sequence[Sequence[int]],
    query_lens: IntsLike | None,
    is_prefill: bool,
) -> tuple[list[int], list[list[int]], list[int], bool]:
    """(context_lens, block tables, query_lens, whether query_lens were defaulted): one entry each
    per sequence."""
    ctx = _as_int_list(context_lens, "context_lens")
    if not ctx:
        raise InvalidRequest("empty batch: context_lens has no sequence")
    if isinstance(block_tables, torch.Tensor):
        raise InvalidRequest("block_tables must be a list of per-sequence lists of block ids")
    try:
        tables = [_as_int_list(t, f"block_tables[{s}]") for s, t in enumerate(block_tables)]
    except TypeError:
        raise InvalidRequest("block_tables must be a list of per-sequence lists of block ids") from None
    if len(tables) != len(ctx):
        raise InvalidRequest(
            f"block_tables has {len(tables)} entries but context_lens has {len(ctx)} sequences"
        )
    given = None if query_lens is None else _as_int_list(query_lens, "query_lens")
    qlens, defaulted = resolve_query_lens(ctx, given, is_prefill)
    return ctx, tables, qlens, defaulted


def check_sequence(
    cache: PagedKvCache, s: int, context_len: int, query_len: int, table: list[int], is_prefill: bool
) -> None:
    """Sequence `s` fits the cache: its blocks exist, are distinct and hold its context."""
    c, q, bs = context_len, query_len, cache.block_size
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
        raise InvalidRequest(f"sequence {s}: block_tables[{s}][{j}] = {b} is outside [0, {cache.num_blocks})")
    if len(set(table)) != len(table):
        seen: set[int] = set()
        dup = next(b for b in table if b in seen or seen.add(b))
        raise InvalidRequest(f"sequence {s}: block_tables[{s}] lists block {dup} more than once")
    if not is_prefill and q != 1:
        raise InvalidRequest(f"sequence {s}: query_len {q} in a decode call (is_prefill false) must be 1")
    if not 1 <= q <= c:
        raise InvalidRequest(f"sequence {s}: query_len {q} is outside [1, context_len {c}]")


@dataclass(frozen=True)
class _TokenIndex:
    """For each new token: its sequence and its index inside that sequence (host arrays)."""

    context_lens: np.ndarray  # int64 [num_seqs]
    cu_query_lens: np.ndarray  # int64 [num_seqs + 1]
    seq_of_token: np.ndarray  # int64 [num_tokens]
    seq_index: np.ndarray  # int64 [num_tokens]: the last query_len of context_len

    @classmethod
    def of(cls, ctx: list[int], qlens: list[int]) -> _TokenIndex:
        qlens_a = np.asarray(qlens, dtype=np.int64)
        ctx_a = np.asarray(ctx, dtype=np.int64)
        seq_of_token = np.repeat(np.arange(len(ctx)), qlens_a)
        cu_q = np.zeros(len(ctx) + 1, dtype=np.int64)
        np.cumsum(qlens_a, out=cu_q[1:])
        seq_index = (ctx_a - qlens_a)[seq_of_token] + np.arange(int(cu_q[-1])) - cu_q[:-1][seq_of_token]
        return cls(ctx_a, cu_q, seq_of_token, seq_index)

    def check_range(self, field: str, values: np.ndarray, low: int, high: int, what: str) -> None:
        """Every value in [low, high), else InvalidRequest naming the first token outside."""
        bad = (values < low) | (values >= high)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            s = int(self.seq_of_token[i])
            raise InvalidRequest(
                f"sequence {s}: {field}[{i}] = {int(values[i])} (token {int(self.seq_index[i])} of the sequence) {what}"
            )


def check_unique_slots(index: _TokenIndex, slots: np.ndarray, stored_index: np.ndarray) -> None:
    """No slot is written twice in one call."""
    stored_slots = slots[stored_index]
    order = np.argsort(stored_slots, kind="stable")
    sorted_slots = stored_slots[order]
    dups = np.flatnonzero(sorted_slots[1:] == sorted_slots[:-1])
    if dups.size:
        first_dup = int(dups[0])
        a, b = (int(i) for i in stored_index[order[first_dup : first_dup + 2]])
        seq = index.seq_of_token
        raise InvalidRequest(
            f"sequence {int(seq[b])}: slot_mapping[{b}] = {int(slots[b])} repeats the slot of "
            f"slot_mapping[{a}] (sequence {int(seq[a])}); each slot can be written once per call"
        )


def check_slots_match_tables(
    index: _TokenIndex, slots: np.ndarray, tables: list[list[int]], table_a: np.ndarray, block_size: int
) -> None:
    """A slot must be where the sequence's block table puts that token: a mismatch would write into
    (and corrupt) another sequence's blocks while this one attends over stale data."""
    bs = block_size
    expected = table_a[index.seq_of_token, index.seq_index // bs] * bs + index.seq_index % bs
    wrong = (slots >= 0) & (slots != expected)
    if wrong.any():
        i = int(np.flatnonzero(wrong)[0])
        s, j = int(index.seq_of_token[i]), int(index.seq_index[i])
        raise InvalidRequest(
            f"sequence {s}: slot_mapping[{i}] = {int(slots[i])} but token {j} of the sequence belongs in "
            f"block {tables[s][j // bs]} at offset {j % bs} (slot {int(expected[i])}) or -1"
        )


def _table_array(tables: list[list[int]]) -> np.ndarray:
    """Block tables as int64 [num_seqs, max_blocks], padded with block 0."""
    table_a = np.zeros((len(tables), max(len(t) for t in tables)), dtype=np.int64)
    for s, t in enumerate(tables):
        table_a[s, : len(t)] = t
    return table_a


def _build_batch(
    cache: PagedKvCache,
    is_prefill: bool,
    ctx: list[int],
    qlens: list[int],
    tables: list[list[int]],
    table_a: np.ndarray,
    tokens: np.ndarray,
    pos: np.ndarray,
    slots: np.ndarray,
    stored_index: np.ndarray,
    index: _TokenIndex,
) -> PagedBatch:
    """The device tensors, built once per call and shared by every layer (see _assemble)."""
    cu_ctx = np.zeros(len(ctx) + 1, dtype=np.int64)
    np.cumsum(index.context_lens, out=cu_ctx[1:])
    if cu_ctx[-1] > INT32_MAX:
        raise InvalidRequest(
            f"the sequences' context lengths add up to {int(cu_ctx[-1])} tokens, beyond the int32 offsets "
            f"the attention kernels take ({INT32_MAX})"
        )
    cu_q = index.cu_query_lens
    return _assemble(
        cache,
        is_prefill,
        ctx,
        qlens,
        tables,
        [tokens, pos, slots, slots[stored_index], stored_index, cu_q[1:] - 1],
        [table_a, cu_q, cu_ctx, index.context_lens],
        all_stored=stored_index.size == tokens.size,
    )


def _assemble(
    cache: PagedKvCache,
    is_prefill: bool,
    ctx: list[int],
    qlens: list[int],
    tables: list[list[int]],
    longs: Sequence[object],
    ints: Sequence[object],
    *,
    all_stored: bool,
) -> PagedBatch:
    """The batch of both paths from its host values (arrays or lists): `longs` are the tokens,
    positions, slots, stored slots, stored rows and last-token rows; `ints` the padded block table,
    cu_query_lens, cu_context_lens and context_lens. Two host-to-device copies in all (one per
    dtype) rather than one per tensor."""
    tokens_d, pos_d, slots_d, store_slots_d, store_rows_d, last_d = _to_device(
        cache.device, torch.long, longs
    )
    table_d, cu_q_d, cu_ctx_d, ctx_d = _to_device(cache.device, torch.int32, ints)
    return PagedBatch(
        num_seqs=len(ctx),
        is_prefill=bool(is_prefill),
        block_size=cache.block_size,
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


_NUMPY_DTYPES = {torch.long: np.int64, torch.int32: np.int32}


def _to_device(device: torch.device, dtype: torch.dtype, parts: Sequence[object]) -> list[torch.Tensor]:
    """`parts` (arrays or lists) converted to `dtype` on `device`, through one copy: contiguous views
    of one buffer. On the CPU there is no transfer to save: each part is converted by NumPy (a copy,
    so the batch never shares memory with the caller's arrays), which costs less than slicing one
    buffer."""
    np_dtype = _NUMPY_DTYPES[dtype]
    if device.type == "cpu":
        return [torch.from_numpy(np.array(p, dtype=np_dtype, order="C")) for p in parts]
    arrays = [np.asarray(p, dtype=np_dtype) for p in parts]
    flat = torch.from_numpy(np.concatenate([a.reshape(-1) for a in arrays])).to(device=device)
    out, offset = [], 0
    for a in arrays:
        out.append(flat[offset : offset + a.size].view(a.shape))
        offset += a.size
    return out
