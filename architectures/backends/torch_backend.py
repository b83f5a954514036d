"""The reference backend: gather each sequence's K/V from its blocks and run PyTorch's
scaled_dot_product_attention with an explicit causal (+ window) mask. Any device, dtype, block size.

Decode sequences (query_len 1) run as one padded batch; prefill sequences run one SDPA call each
(no loop over tokens). GQA without copying K/V: the G query heads that share a KV head are folded
into the query length, so SDPA sees n_kv_heads heads of G * L queries each.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..paged_batch import PagedBatch, PagedKvCache


def _slots(table: torch.Tensor, index: torch.Tensor, block_size: int) -> torch.Tensor:
    """Slots of sequence indices `index` (any shape) through block table rows `table` ([..., blocks])."""
    return table.gather(-1, index // block_size) * block_size + index % block_size


@dataclass
class _PrefillSeq:
    rows: slice  # this sequence's rows of q
    query_len: int
    context_len: int
    table: torch.Tensor  # long [num_blocks of the sequence]


@dataclass
class TorchPlan:
    decode_rows: torch.Tensor | None  # long [Bd]: q rows of the decode sequences
    decode_ctx: torch.Tensor | None  # long [Bd]
    decode_tables: torch.Tensor | None  # long [Bd, max_blocks]
    decode_max_ctx: int  # longest context among the decode sequences (host-side: no device sync)
    prefill: list[_PrefillSeq]
    all_decode: bool
    # Per window: gather indices and masks, built on the first layer that uses that window.
    decode_by_window: dict[int | None, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    prefill_by_window: dict[int | None, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)


class TorchBackend:
    name = "torch"

    def plan(self, cache: PagedKvCache, batch: PagedBatch) -> TorchPlan:
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
        ctx = batch.context_lens_t.long()
        if not prefill:  # the hot path: every index is already on the device
            return TorchPlan(
                batch.last_token_indices, ctx, tables, batch.max_context_len, [], all_decode=True
            )
        if decode:
            idx = torch.tensor(decode, dtype=torch.long).to(dev)
            # a decode sequence's only query row is its last token
            rows = batch.last_token_indices.index_select(0, idx)
            longest = max(batch.context_lens[s] for s in decode)
            return TorchPlan(
                rows,
                ctx.index_select(0, idx),
                tables.index_select(0, idx),
                longest,
                prefill,
                all_decode=False,
            )
        return TorchPlan(None, None, None, 0, prefill, all_decode=False)

    def attend(
        self,
        cache: PagedKvCache,
        layer_idx: int,
        q: torch.Tensor,
        batch: PagedBatch,
        plan: TorchPlan,
        window: int | None,
        scale: float,
    ) -> torch.Tensor:
        k_flat, v_flat = cache.flat_k(layer_idx), cache.flat_v(layer_idx)
        q = q.to(k_flat.dtype)
        n_kv = cache.num_kv_heads
        groups = q.shape[1] // n_kv
        d = cache.head_dim
        if plan.all_decode:
            return self._decode(q, k_flat, v_flat, plan, cache.block_size, window, scale, n_kv, groups)
        out = torch.empty_like(q)
        if plan.decode_rows is not None:
            q_dec = q.index_select(0, plan.decode_rows)
            out[plan.decode_rows] = self._decode(
                q_dec, k_flat, v_flat, plan, cache.block_size, window, scale, n_kv, groups
            )
        per_seq = plan.prefill_by_window.get(window)
        if per_seq is None:
            per_seq = [_prefill_keys(p, cache.block_size, window, groups) for p in plan.prefill]
            plan.prefill_by_window[window] = per_seq
        for p, (slots, mask) in zip(plan.prefill, per_seq, strict=True):
            length = p.query_len
            # [L, H, D] → [Hkv, G * L, D]: query heads h = kv * G + g share KV head kv.
            q_s = (
                q[p.rows].view(length, n_kv, groups, d).permute(1, 2, 0, 3).reshape(n_kv, groups * length, d)
            )
            k_s = k_flat.index_select(0, slots).transpose(0, 1)  # [Hkv, keys, D]
            v_s = v_flat.index_select(0, slots).transpose(0, 1)
            o = F.scaled_dot_product_attention(q_s, k_s, v_s, attn_mask=mask, scale=scale)
            # [Hkv, G * L, D] → [L, H, D]
            out[p.rows] = (
                o.view(n_kv, groups, length, d).permute(2, 0, 1, 3).reshape(length, n_kv * groups, d)
            )
        return out

    def _decode(
        self,
        q: torch.Tensor,
        k_flat: torch.Tensor,
        v_flat: torch.Tensor,
        plan: TorchPlan,
        block_size: int,
        window: int | None,
        scale: float,
        n_kv: int,
        groups: int,
    ) -> torch.Tensor:
        """q [Bd, H, D], one query per sequence at its last position → [Bd, H, D]."""
        cached = plan.decode_by_window.get(window)
        if cached is None:
            cached = _decode_keys(plan, block_size, window)
            plan.decode_by_window[window] = cached
        index, mask = cached  # slots [Bd, M] (or whole blocks [Bd, M / block_size]), mask [Bd, 1, 1, M]
        bd, width = mask.shape[0], mask.shape[-1]
        d = q.shape[-1]
        flat = index.reshape(-1)
        if window is None:
            # Whole blocks as rows of block_size * Hkv * D: a few large copies instead of one per token.
            k_flat = k_flat.view(-1, block_size * n_kv * d)
            v_flat = v_flat.view(-1, block_size * n_kv * d)
        k = k_flat.index_select(0, flat).view(bd, width, n_kv, d).transpose(1, 2)  # [Bd, Hkv, M, D]
        v = v_flat.index_select(0, flat).view(bd, width, n_kv, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(q.view(bd, n_kv, groups, d), k, v, attn_mask=mask, scale=scale)
        return o.reshape(bd, n_kv * groups, d)


def _decode_keys(plan: TorchPlan, block_size: int, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather slots [Bd, M] and mask [Bd, 1, 1, M] of the decode sequences. With a window only the
    last `window` keys are gathered, so decode cost does not grow with the context. Without one,
    whole blocks: block ids [Bd, M / block_size], M rounded up to a multiple of the block size (the
    keys past a sequence's context are masked; a shorter table's padding is block 0, masked too)."""
    ctx = plan.decode_ctx
    if window is None:
        blocks = -(-plan.decode_max_ctx // block_size)
        j = torch.arange(blocks * block_size, device=ctx.device)
        valid = j[None, :] < ctx[:, None]
        return plan.decode_tables[:, :blocks], valid[:, None, None, :]
    start = (ctx - window).clamp(min=0)
    seen = ctx - start  # keys each sequence attends to
    width = min(plan.decode_max_ctx, window)
    j = torch.arange(width, device=ctx.device)
    valid = j[None, :] < seen[:, None]
    index = torch.where(valid, start[:, None] + j[None, :], 0)
    return _slots(plan.decode_tables, index, block_size), valid[:, None, None, :]


def _prefill_keys(
    p: _PrefillSeq, block_size: int, window: int | None, groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots [keys] and mask [G * L, keys] (query g * L + l is query l of group member g).

    Keys before the first query's window are never seen, so they are not gathered.
    """
    dev = p.table.device
    first_query = p.context_len - p.query_len
    k_start = 0 if window is None else max(0, first_query - window + 1)
    k_pos = torch.arange(k_start, p.context_len, device=dev)
    q_pos = torch.arange(first_query, p.context_len, device=dev)
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed &= k_pos[None, :] > q_pos[:, None] - window
    return _slots(p.table, k_pos, block_size), allowed.repeat(groups, 1)
