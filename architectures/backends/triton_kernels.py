"""Triton kernels of the `triton` backend over the paged KV cache.

Cache layout per layer: [num_slots, num_kv_heads, head_dim] (slot = block_id * block_size + offset).
Keys are read one slot at a time through the block table, so any block size works (tiles of keys
do not have to line up with blocks).

- `store_kv_kernel`: one program per BLOCK_T new tokens copies their K and V (all KV heads) into
  their slots; slot -1 is skipped.
- `varlen_attention_kernel`: prefill, prefill over a cached prefix, and mixed batches. One program
  per (tile of BLOCK_Q queries of one sequence, KV head); the rows of a tile are the BLOCK_Q queries
  times the GROUPS query heads that share the KV head (GQA without copying K/V), so a tile's
  rows are `q_index * GROUPS + group`. Online softmax over key tiles, causal and window masks by
  position in the sequence.
- `decode_attention_kernel` + `reduce_splits_kernel`: one query per sequence. Split-K: the keys of
  a sequence are cut into NUM_SPLITS chunks, each program (sequence, KV head, split) writes a
  partial (unnormalized output, running max, sum), and the reduce kernel combines them. The chunk
  bounds come from the context length on the device, so a fixed split count serves any context
  (what CUDA graphs need).

UPCAST (fp32 data, or the CPU interpreter, whose bfloat16 arithmetic is not reliable) computes the
dot products in float32 with IEEE precision; otherwise q/k/v enter `tl.dot` in their own half
precision with float32 accumulation, as FlashAttention does.

This module is imported only when the backend is built: `@triton.jit` decides at import time
whether kernels run compiled or under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def store_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    num_tokens,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Tokens [pid * BLOCK_T, ...) → their slots; [BLOCK_T, BLOCK_H, BLOCK_D] elements per side."""
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    slot = tl.load(slot_ptr + t, mask=t < num_tokens, other=-1).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (slot >= 0)[:, None, None] & (h[None, :, None] < NUM_KV_HEADS) & (d[None, None, :] < HEAD_DIM)
    hd = h[None, :, None] * HEAD_DIM + d[None, None, :]
    dst = slot[:, None, None] * (NUM_KV_HEADS * HEAD_DIM) + hd
    src_k = t[:, None, None] * stride_kt + h[None, :, None] * stride_kh + d[None, None, :]
    src_v = t[:, None, None] * stride_vt + h[None, :, None] * stride_vh + d[None, None, :]
    tl.store(k_cache_ptr + dst, tl.load(k_ptr + src_k, mask=mask), mask=mask)
    tl.store(v_cache_ptr + dst, tl.load(v_ptr + src_v, mask=mask), mask=mask)


@triton.jit
def _softcap(s, softcap):
    # softcap * tanh(s / softcap), tanh through exp (no libdevice: the interpreter runs it too).
    x = s / softcap
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return softcap * tl.where(x < 0, -t, t)


@triton.jit
def _attend_tile(
    q,
    k_cache_ptr,
    v_cache_ptr,
    table_row_ptr,
    kv_head,
    j,
    j_ok,
    q_pos,
    m_i,
    l_i,
    acc,
    scale,
    softcap,
    window,
    d,
    d_ok,
    BLOCK_SIZE: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One key tile: keys at sequence positions j [BLOCK_N] against q [BLOCK_M, BLOCK_D]."""
    block = tl.load(table_row_ptr + j // BLOCK_SIZE, mask=j_ok, other=0).to(tl.int64)
    slot = block * BLOCK_SIZE + j % BLOCK_SIZE
    offs = slot[:, None] * (NUM_KV_HEADS * HEAD_DIM) + kv_head * HEAD_DIM + d[None, :]
    kv_mask = j_ok[:, None] & d_ok[None, :]
    k = tl.load(k_cache_ptr + offs, mask=kv_mask, other=0.0)
    v = tl.load(v_cache_ptr + offs, mask=kv_mask, other=0.0)
    if UPCAST:
        s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * scale
    if USE_SOFTCAP:
        s = _softcap(s, softcap)
    allowed = j_ok[None, :]
    if CAUSAL:
        allowed = allowed & (j[None, :] <= q_pos[:, None])
    if USE_WINDOW:
        allowed = allowed & (j[None, :] > q_pos[:, None] - window)
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet stays at 0
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if UPCAST:
        pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    return m_new, l_i, acc


@triton.jit
def varlen_attention_kernel(
    out_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_table_ptr,
    cu_q_ptr,
    ctx_ptr,
    tile_seq_ptr,
    tile_start_ptr,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    scale,
    softcap,
    window,
    BLOCK_SIZE: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    GROUPS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.load(tile_seq_ptr + tile)
    q_first = tl.load(tile_start_ptr + tile)  # index of the tile's first query among the sequence's
    q_begin = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_begin
    ctx = tl.load(ctx_ptr + seq)
    first_pos = ctx - q_len  # position of the sequence's first query

    m = tl.arange(0, BLOCK_M)
    qi = q_first + m // GROUPS
    row_ok = (m < BLOCK_Q * GROUPS) & (qi < q_len)
    head = kv_head * GROUPS + m % GROUPS
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    token = (q_begin + qi).to(tl.int64)
    q = tl.load(
        q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    q_pos = first_pos + qi

    # Keys the tile can see: up to its last query, from the first query's window on.
    hi = tl.minimum(first_pos + q_first + BLOCK_Q, ctx)
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(first_pos + q_first - window + 1, 0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table_row_ptr = block_table_ptr + seq.to(tl.int64) * stride_bt
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        m_i, l_i, acc = _attend_tile(
            q, k_cache_ptr, v_cache_ptr, table_row_ptr, kv_head, j, j < hi, q_pos, m_i, l_i, acc,
            scale, softcap, window, d, d_ok,
            BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, True, USE_WINDOW, USE_SOFTCAP, UPCAST,
        )  # fmt: skip
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(
        out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )


@triton.jit
def decode_attention_kernel(
    out_ptr,
    part_acc_ptr,
    part_max_ptr,
    part_sum_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_table_ptr,
    ctx_ptr,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    num_splits,
    scale,
    softcap,
    window,
    BLOCK_SIZE: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    GROUPS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr,
):
    """Sequence s's only query is q row s, at position context_len - 1. Partials are laid out
    [num_seqs, num_heads, num_splits] (+ [head_dim] for the accumulator)."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_ptr + seq)
    g = tl.arange(0, BLOCK_G)
    g_ok = g < GROUPS
    head = kv_head * GROUPS + g
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    row = seq.to(tl.int64)
    q = tl.load(
        q_ptr + row * stride_qt + head[:, None] * stride_qh + d[None, :],
        mask=g_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(ctx - window, 0)
    chunk = tl.cdiv(tl.cdiv(ctx - lo, num_splits), BLOCK_N) * BLOCK_N
    start = lo + split * chunk
    end = tl.minimum(start + chunk, ctx)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    q_pos = tl.zeros([BLOCK_G], tl.int32) + ctx - 1
    table_row_ptr = block_table_ptr + row * stride_bt
    for k_start in range(start, end, BLOCK_N):
        j = k_start + tl.arange(0, BLOCK_N)
        m_i, l_i, acc = _attend_tile(
            q, k_cache_ptr, v_cache_ptr, table_row_ptr, kv_head, j, j < end, q_pos, m_i, l_i, acc,
            scale, softcap, window, d, d_ok,
            BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, False, False, USE_SOFTCAP, UPCAST,
        )  # fmt: skip
    if SINGLE_SPLIT:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(
            out_ptr + row * stride_ot + head[:, None] * stride_oh + d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=g_ok[:, None] & d_ok[None, :],
        )
    else:
        part = (row * (NUM_KV_HEADS * GROUPS) + head) * num_splits + split  # [BLOCK_G]
        tl.store(part_max_ptr + part, m_i, mask=g_ok)
        tl.store(part_sum_ptr + part, l_i, mask=g_ok)
        tl.store(
            part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :]
        )


@triton.jit
def reduce_splits_kernel(
    out_ptr,
    part_acc_ptr,
    part_max_ptr,
    part_sum_ptr,
    stride_ot,
    stride_oh,
    num_splits,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Combine the splits of (sequence, head): each split's sum and output rescaled to the common max."""
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    s_ok = s < num_splits
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    part = (seq * NUM_HEADS + head) * num_splits + s
    m = tl.load(part_max_ptr + part, mask=s_ok, other=float("-inf"))
    l_s = tl.load(part_sum_ptr + part, mask=s_ok, other=0.0)
    acc = tl.load(
        part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0
    )
    m_max = tl.max(m, 0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp(m - m_safe)  # an empty split (max -inf) weighs 0
    total = tl.sum(l_s * w, 0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)
