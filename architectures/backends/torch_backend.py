"""The reference backend: gather each sequence's K/V from its blocks and run PyTorch's
scaled_dot_product_attention with an explicit causal (+ window) mask. Any device, dtype, block size.

Working memory is bounded whatever the call: keys are gathered in chunks of at most
`KEY_CHUNK_BYTES` of K+V, queries in chunks whose mask (and, past one key chunk, score matrix) stays
under `SCORE_CHUNK_BYTES`, and decode sequences are grouped so that a group's gathered keys fit the
same bound. When a query chunk's keys fit one key chunk (every decode step and prefill of an
ordinary length) SDPA runs on 4-D `[batch, heads, len, dim]` inputs, so PyTorch picks a fused kernel
(`_scaled_dot_product_flash_attention_for_cpu` on CPU, flash/memory-efficient on CUDA) instead of the
math path that upcasts and builds the whole score matrix. Longer contexts are attended chunk by chunk
with an online softmax (float32 running max, sum and output), as flash attention does internally.

GQA without copying K/V: decode folds the G query heads that share a KV head into the query length
(SDPA sees n_kv_heads heads of G queries); prefill passes `enable_gqa`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..paged_batch import PagedBatch, PagedKvCache
from ..softcap import attention as softcap_attention

# Bounds of one attention step's transient tensors (per layer; freed before the next step).
KEY_CHUNK_BYTES = 16 << 20  # gathered K + V of one chunk (all sequences of a decode group)
SCORE_CHUNK_BYTES = 16 << 20  # a query chunk's float32 scores (or its bool mask on the fused path)

# (k [B, Hkv, c, D], v [B, Hkv, c, D], mask broadcastable to [B, 1, Lq, c]) of one key chunk.
KeyChunk = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def attention_working_bytes() -> int:
    """Upper bound of the attention transients of one call (one step at a time, any backend call)."""
    # K+V chunk, float32 scores and their exp, the running output/max/sum, the gather indices.
    return 2 * KEY_CHUNK_BYTES + 3 * SCORE_CHUNK_BYTES


def _slots(table: torch.Tensor, index: torch.Tensor, block_size: int) -> torch.Tensor:
    """Slots of sequence indices `index` (any shape) through block table rows `table` ([..., blocks])."""
    return table.gather(-1, index // block_size) * block_size + index % block_size


@dataclass
class _PrefillSeq:
    rows: slice  # this sequence's rows of q
    query_len: int
    context_len: int
    table: torch.Tensor  # long [num_blocks of the sequence]
    # Per window, the slots [keys] and mask [1, 1, L, keys] of a sequence attended in one step
    # (one query chunk, one key chunk): built on the first layer, reused by the others.
    keys_by_window: dict[int | None, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


@dataclass
class _DecodeKeys:
    """Where one chunk of a decode group's keys are: `index` long [B * n] (whole blocks when
    `by_block`, else slots), mask bool [B, 1, 1, c] (None: every key is seen).

    `slots`: for one sequence whose blocks are consecutive in the cache, the range of its whole
    blocks' slots (`index` is then None): the keys are a view of the cache, no gather."""

    index: torch.Tensor | None
    mask: torch.Tensor | None
    by_block: bool
    rows: int
    keys: int
    slots: slice | None = None

    def gather(self, k_flat: torch.Tensor, v_flat: torch.Tensor, cache: PagedKvCache) -> KeyChunk:
        b, c = self.rows, self.keys
        n_kv, d = cache.num_kv_heads, cache.head_dim
        if self.slots is not None:
            k, v = k_flat[self.slots], v_flat[self.slots]
        else:
            assert self.index is not None
            if self.by_block:  # rows of block_size * Hkv * D: a few large copies, not one per token
                k_flat = k_flat.view(-1, cache.block_size * n_kv * d)
                v_flat = v_flat.view(-1, cache.block_size * n_kv * d)
            k, v = k_flat.index_select(0, self.index), v_flat.index_select(0, self.index)
        return k.view(b, c, n_kv, d).transpose(1, 2), v.view(b, c, n_kv, d).transpose(1, 2), self.mask


@dataclass
class TorchPlan:
    decode_rows: torch.Tensor | None  # long [Bd]: q rows of the decode sequences
    decode_ctx: torch.Tensor | None  # int [Bd]
    decode_tables: torch.Tensor | None  # int [Bd, max_blocks]
    decode_ctx_host: list[int]  # the same context lengths on the host (grouping without a device sync)
    prefill: list[_PrefillSeq]
    all_decode: bool
    # The decode keys of a call that is one group and one chunk, per window (the hot path: every
    # layer reuses them).
    decode_by_window: dict[int | None, _DecodeKeys | None] = field(default_factory=dict)
    decode_tables_host: list[list[int]] = field(default_factory=list)  # the block tables, on the host

    @property
    def decode_max_ctx(self) -> int:
        return max(self.decode_ctx_host, default=0)


class TorchBackend:
    name = "torch"

    def plan(self, cache: PagedKvCache, batch: PagedBatch) -> TorchPlan:
        if batch.is_decode_only:  # the hot path: every index is already on the device
            return TorchPlan(
                batch.last_token_indices,
                batch.context_lens_t,
                batch.block_table,
                batch.context_lens,
                [],
                all_decode=True,
                decode_tables_host=batch.block_tables,
            )
        dev = cache.device
        tables = batch.block_table.long()
        decode = [s for s in range(batch.num_seqs) if batch.query_lens[s] == 1]
        starts = [0]
        for q in batch.query_lens:
            starts.append(starts[-1] + q)
        prefill = [
            _PrefillSeq(
                rows=slice(starts[s], starts[s + 1]),
                query_len=batch.query_lens[s],
                context_len=batch.context_lens[s],
                table=tables[s, : len(batch.block_tables[s])],
            )
            for s in range(batch.num_seqs)
            if batch.query_lens[s] > 1
        ]
        if decode:
            idx = torch.tensor(decode, dtype=torch.long).to(dev)
            # a decode sequence's only query row is its last token
            rows = batch.last_token_indices.index_select(0, idx)
            return TorchPlan(
                rows,
                batch.context_lens_t.index_select(0, idx),
                batch.block_table.index_select(0, idx),
                [batch.context_lens[s] for s in decode],
                prefill,
                all_decode=False,
                decode_tables_host=[batch.block_tables[s] for s in decode],
            )
        return TorchPlan(None, None, None, [], prefill, all_decode=False)

    def attend(
        self,
        cache: PagedKvCache,
        layer_idx: int,
        q: torch.Tensor,
        batch: PagedBatch,
        plan: TorchPlan,
        window: int | None,
        scale: float,
        softcap: float | None = None,
    ) -> torch.Tensor:
        k_flat, v_flat = cache.flat_k(layer_idx), cache.flat_v(layer_idx)
        if q.dtype != k_flat.dtype:
            q = q.to(k_flat.dtype)
        if plan.all_decode:
            return _decode(q, k_flat, v_flat, plan, cache, window, scale, softcap)
        out = torch.empty_like(q)
        if plan.decode_rows is not None:
            q_dec = q.index_select(0, plan.decode_rows)
            out[plan.decode_rows] = _decode(q_dec, k_flat, v_flat, plan, cache, window, scale, softcap)
        for p in plan.prefill:
            out[p.rows] = _prefill(q[p.rows], k_flat, v_flat, p, cache, window, scale, softcap)
        return out


# -- the two kinds of sequences ----------------------------------------------------------------
def _key_bytes(cache: PagedKvCache) -> int:
    """Bytes of one key's K + V."""
    return 2 * cache.num_kv_heads * cache.head_dim * cache.dtype.itemsize


def _key_chunk(cache: PagedKvCache, rows: int) -> int:
    """Keys per chunk for `rows` sequences gathered together: a multiple of the block size."""
    bs = cache.block_size
    keys = KEY_CHUNK_BYTES // max(1, rows * _key_bytes(cache))
    return max(bs, keys // bs * bs)


def _decode(
    q: torch.Tensor,
    k_flat: torch.Tensor,
    v_flat: torch.Tensor,
    plan: TorchPlan,
    cache: PagedKvCache,
    window: int | None,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """q [Bd, H, D], one query per sequence at its last position → [Bd, H, D]."""
    bd, heads, d = q.shape
    n_kv = cache.num_kv_heads
    q4 = q.view(bd, n_kv, heads // n_kv, d)  # [Bd, Hkv, G, D]: a KV head's G queries as its query length
    if window in plan.decode_by_window:
        keys = plan.decode_by_window[window]
        if keys is not None:
            return _sdpa(q4, *keys.gather(k_flat, v_flat, cache), scale, softcap).reshape(bd, heads, d)
    groups = _decode_groups(plan, cache, window)
    if len(groups) == 1:
        rows, width, chunk = groups[0]
        if width <= chunk:  # one group, one chunk: keep its indices for the other layers
            keys = _consecutive_keys(plan, cache, rows, width, window)
            if keys is None:
                keys = next(_decode_keys(plan, cache, rows, width, chunk, window))
                if all(c == width for c in plan.decode_ctx_host):  # every key is seen: no mask
                    keys.mask = None
            plan.decode_by_window[window] = keys
            return _sdpa(q4, *keys.gather(k_flat, v_flat, cache), scale, softcap).reshape(bd, heads, d)
    plan.decode_by_window[window] = None
    out = torch.empty_like(q4)
    for rows, width, chunk in groups:
        chunks = (
            keys.gather(k_flat, v_flat, cache)
            for keys in _decode_keys(plan, cache, rows, width, chunk, window)
        )
        out[rows] = _attend_chunks(q4[rows], chunks, width <= chunk, scale, softcap)
    return out.reshape(bd, heads, d)


def _consecutive_keys(
    plan: TorchPlan, cache: PagedKvCache, rows: slice, width: int, window: int | None
) -> _DecodeKeys | None:
    """The keys of a one-sequence group (no window) whose blocks are consecutive in the cache, in
    order: its whole blocks as a view of the cache (no gather). The same keys and mask as a gather
    would give, so that a sequence decodes to the same bits wherever its blocks lie."""
    if window is not None or rows.stop - rows.start != 1 or not plan.decode_tables_host:
        return None
    table = plan.decode_tables_host[rows.start][: width // cache.block_size]
    first = table[0]
    if table != list(range(first, first + len(table))):
        return None
    start, ctx = first * cache.block_size, plan.decode_ctx_host[rows.start]
    mask = None if ctx == width else torch.arange(width, device=cache.device)[None, None, None, :] < ctx
    return _DecodeKeys(None, mask, True, 1, width, slots=slice(start, start + width))


def _decode_width(ctx: int, cache: PagedKvCache, window: int | None) -> int:
    """Keys gathered for a decode sequence of context `ctx`: whole blocks without a window, the last
    `window` keys with one (so decode cost does not grow with the context)."""
    if window is None:
        bs = cache.block_size
        return -(-ctx // bs) * bs
    return min(ctx, window)


def _decode_groups(plan: TorchPlan, cache: PagedKvCache, window: int | None) -> list[tuple[slice, int, int]]:
    """Consecutive decode sequences gathered together: (rows, key width, keys per chunk). A group's
    whole width fits KEY_CHUNK_BYTES; a sequence too long for that is a group of its own, attended
    chunk by chunk."""
    out: list[tuple[slice, int, int]] = []
    start, width = 0, 0
    ctxs = plan.decode_ctx_host
    kb = _key_bytes(cache)
    for i, c in enumerate(ctxs):
        own = _decode_width(c, cache, window)
        w = max(width, own)
        if i > start and (i - start + 1) * w * kb > KEY_CHUNK_BYTES:
            out.append((slice(start, i), width, _key_chunk(cache, i - start)))
            start, w = i, own
        width = w
    out.append((slice(start, len(ctxs)), width, _key_chunk(cache, len(ctxs) - start)))
    return out


def _decode_keys(
    plan: TorchPlan,
    cache: PagedKvCache,
    rows: slice,
    width: int,
    chunk: int,
    window: int | None,
) -> Iterator[_DecodeKeys]:
    """The keys of decode sequences `rows`, `chunk` at a time.

    Without a window, whole blocks; a shorter table's padding is block 0 and keys past a sequence's
    context are masked. With one, key j of a sequence is token ctx - seen + j, where
    seen = min(ctx, window)."""
    assert plan.decode_ctx is not None and plan.decode_tables is not None
    ctx = plan.decode_ctx[rows].long()
    tables = plan.decode_tables[rows].long()
    bs = cache.block_size
    start = (ctx - window).clamp(min=0) if window is not None else ctx
    seen = ctx - start
    for a in range(0, width, chunk):
        c = min(chunk, width - a)
        j = torch.arange(a, a + c, device=ctx.device)
        if window is None:
            index = tables[:, a // bs : (a + c) // bs].reshape(-1)
            valid = j[None, :] < ctx[:, None]
        else:
            valid = j[None, :] < seen[:, None]
            index = _slots(tables, torch.where(valid, start[:, None] + j[None, :], 0), bs).reshape(-1)
        yield _DecodeKeys(index, valid[:, None, None, :], window is None, len(ctx), c)


def _prefill(
    q: torch.Tensor,
    k_flat: torch.Tensor,
    v_flat: torch.Tensor,
    p: _PrefillSeq,
    cache: PagedKvCache,
    window: int | None,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """q [L, H, D] of one sequence's last L tokens → [L, H, D], query chunk by query chunk.

    Keys before a chunk's first query's window are never seen, so they are not gathered."""
    length, heads, d = q.shape
    q4 = q.transpose(0, 1).unsqueeze(0)  # [1, H, L, D]
    out = torch.empty(1, heads, length, d, dtype=q.dtype, device=q.device)
    first_query = p.context_len - p.query_len
    chunk = _key_chunk(cache, 1)
    dev = p.table.device
    step = _query_chunk(heads, min(chunk, p.context_len), length)
    k_start = 0 if window is None else max(0, first_query - window + 1)
    if step >= length and p.context_len - k_start <= chunk:  # one step: the common case
        cached = p.keys_by_window.get(window)
        if cached is None:
            q_pos = torch.arange(first_query, p.context_len, device=dev)
            cached = _prefill_keys(p.table, cache.block_size, q_pos, k_start, p.context_len, window)
            p.keys_by_window[window] = cached
        slots, mask = cached
        k = k_flat.index_select(0, slots).transpose(0, 1).unsqueeze(0)  # [1, Hkv, keys, D]
        v = v_flat.index_select(0, slots).transpose(0, 1).unsqueeze(0)
        return _sdpa(q4, k, v, mask, scale, softcap)[0].transpose(0, 1)
    for qa in range(0, length, step):
        qb = min(length, qa + step)
        q_first, q_end = first_query + qa, first_query + qb  # positions of this chunk's queries
        k_start = 0 if window is None else max(0, q_first - window + 1)
        q_pos = torch.arange(q_first, q_end, device=dev)
        keys = q_end - k_start
        out[:, :, qa:qb] = _attend_chunks(
            q4[:, :, qa:qb],
            _prefill_chunks(k_flat, v_flat, p.table, cache, q_pos, k_start, q_end, chunk, window),
            keys <= chunk,
            scale,
            softcap,
        )
    return out[0].transpose(0, 1)


def _query_chunk(heads: int, keys: int, length: int) -> int:
    """Queries per chunk: their float32 scores against `keys` keys within SCORE_CHUNK_BYTES."""
    return max(1, min(length, SCORE_CHUNK_BYTES // max(1, 4 * heads * keys)))


def _prefill_keys(
    table: torch.Tensor, block_size: int, q_pos: torch.Tensor, a: int, b: int, window: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots [b - a] of a sequence's keys a..b-1, and which queries (positions q_pos) see each:
    mask [1, 1, Lq, b - a]."""
    k_pos = torch.arange(a, b, device=q_pos.device)
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed &= k_pos[None, :] > q_pos[:, None] - window
    return _slots(table, k_pos, block_size), allowed[None, None]


def _prefill_chunks(
    k_flat: torch.Tensor,
    v_flat: torch.Tensor,
    table: torch.Tensor,
    cache: PagedKvCache,
    q_pos: torch.Tensor,
    k_start: int,
    k_end: int,
    chunk: int,
    window: int | None,
) -> Iterator[KeyChunk]:
    """Keys [k_start, k_end) of one sequence, `chunk` at a time: K/V [1, Hkv, c, D], mask [1, 1, Lq, c]."""
    for a in range(k_start, k_end, chunk):
        slots, mask = _prefill_keys(table, cache.block_size, q_pos, a, min(k_end, a + chunk), window)
        yield (
            k_flat.index_select(0, slots).transpose(0, 1).unsqueeze(0),
            v_flat.index_select(0, slots).transpose(0, 1).unsqueeze(0),
            mask,
        )


# -- attention over key chunks -------------------------------------------------------------------
def _sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """q [B, H, Lq, D], k/v [B, Hkv, c, D] (H a multiple of Hkv), mask [B or 1, 1, Lq or 1, c]: 4-D,
    so the fused kernels run."""
    if softcap:  # Gemma 2: SDPA has no softcap; the explicit path caps the scaled scores
        return softcap_attention(q, k, v, mask, scale, softcap, enable_gqa=q.shape[1] != k.shape[1])
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


def _attend_chunks(
    q: torch.Tensor, chunks: Iterator[KeyChunk], single: bool, scale: float, softcap: float | None = None
) -> torch.Tensor:
    """Attention of q [B, H, Lq, D] over the keys of `chunks` → [B, H, Lq, D]. One chunk: SDPA.
    More: an online softmax in float32 (running max m, sum total and output acc per query), so only one
    chunk's keys and scores exist at a time. Every query sees at least one key in all (itself)."""
    if single:
        return _sdpa(q, *next(chunks), scale, softcap)
    b, heads, lq, d = q.shape
    qf: torch.Tensor | None = None
    m = total = acc = None
    for k, v, mask in chunks:
        n_kv = k.shape[1]
        if qf is None:
            qf = q.float().view(b, n_kv, heads // n_kv, lq, d) * scale  # [B, Hkv, G, Lq, D]
            m = torch.full((b, n_kv, heads // n_kv, lq, 1), float("-inf"), device=q.device)
            total = torch.zeros_like(m)
            acc = torch.zeros_like(qf)
        s = qf @ k.float().unsqueeze(2).transpose(-1, -2)  # [B, Hkv, G, Lq, c]
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        s.masked_fill_(~mask.unsqueeze(2), float("-inf"))
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        safe = m_new.masked_fill(m_new == float("-inf"), 0.0)  # rows with nothing seen yet
        s.sub_(safe).exp_()
        correction = (m - safe).exp_()
        total = total * correction + s.sum(-1, keepdim=True)
        acc = acc * correction + s @ v.float().unsqueeze(2)
        m = m_new
        del s
    assert acc is not None and total is not None
    return (acc / total).view(b, heads, lq, d).to(q.dtype)


__all__ = ["KEY_CHUNK_BYTES", "SCORE_CHUNK_BYTES", "TorchBackend", "attention_working_bytes"]
