"""A CPU stand-in for the two flash-attn entry points the flash backend calls, written from their
documented contract (flash_attn/flash_attn_interface.py, FlashAttention-2 >= 2.6): same parameter
names and defaults, the same argument checks the CUDA extension makes for the paged path (int32
metadata, [num_blocks, page_block_size, n_kv_heads, head_dim] caches, page_block_size % 256 == 0),
and the documented semantics (causal mask aligned bottom-right; a query i of seqlen_q keeps keys in
[i + sk - sq - left, i + sk - sq + right], -1 meaning unbounded). flash-attn needs CUDA, so this is
how the backend's wiring runs on CPU; tests/architectures_paged/test_gpu.py runs the real package.

It is as strict as flash-attn v2.8.3's csrc/flash_attn/flash_api.cpp and its torch.library op
signatures: fp16/bf16 only, q/k/v of one dtype and on one device, int32 contiguous cu_seqlens,
cache_seqlens and block_table, head_dim a multiple of 8 up to 256, max_seqlen_* Python ints and
softmax_scale a Python float. (The real kernels also need CUDA tensors; here one device is enough.)
The attention itself is computed in float64 and rounded to q's dtype, as a kernel's output is."""

from __future__ import annotations

import torch

calls: list[str] = []
HALF = (torch.float16, torch.bfloat16)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    assert q.dtype in HALF, "FlashAttention only support fp16 and bf16 data type"
    assert k.dtype == q.dtype and v.dtype == q.dtype, "query and key must have the same dtype"
    assert k.device == q.device and v.device == q.device, "q, k and v must be on the same device"
    assert q.stride(-1) == 1, "Input tensor must have contiguous last dimension"
    head_dim = q.shape[-1]
    assert head_dim <= 256, "FlashAttention forward only supports head dimension at most 256"
    assert head_dim % 8 == 0, "query, key, value, and out_ must have a head_size that is a multiple of 8"
    assert k.shape[-1] == head_dim, "k head_dim must equal q's"


def _check_int32_vector(t: torch.Tensor, name: str, device: torch.device) -> None:
    assert isinstance(t, torch.Tensor) and t.dtype == torch.int32, f"{name} must have dtype int32"
    assert t.device == device, f"{name} must be on the same device as q"
    assert t.dim() == 1 and t.is_contiguous(), f"{name} must be contiguous"


def _check_scalars(softmax_scale, *ints) -> None:
    for value in ints:  # the op schema says `int`: a tensor or a numpy integer is refused
        assert type(value) is int, f"expected a Python int, got {type(value).__name__}"
    assert softmax_scale is None or type(softmax_scale) is float, (
        f"softmax_scale must be a Python float, got {type(softmax_scale).__name__}"
    )


def _check_paged(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, batch: int) -> None:
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, "paged caches are 4-D"
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "cache must have contiguous last dimension"
    assert k_cache.shape[1] % 256 == 0, "Paged KV cache block size must be divisible by 256"
    assert block_table.dtype == torch.int32, "block_table must have dtype torch.int32"
    assert block_table.device == k_cache.device, "block_table must be on the same device as the cache"
    assert block_table.dim() == 2 and block_table.shape[0] == batch, "block_table must be [batch, max_blocks]"
    assert block_table.stride(-1) == 1, "block_table must have contiguous last dimension"


def _attend(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    table: torch.Tensor,
    seqlen_k: int,
    scale: float,
    causal: bool,
    window_size: tuple[int, int],
    softcap: float = 0.0,
) -> torch.Tensor:
    """q [sq, H, D] of one sequence over its first seqlen_k keys through its block table row."""
    bs = k_cache.shape[1]
    j = torch.arange(seqlen_k)
    blocks = table.long()[j // bs]
    k = k_cache[blocks, j % bs]  # [sk, Hkv, D]
    v = v_cache[blocks, j % bs]
    sq, heads, _ = q.shape
    assert heads % k.shape[1] == 0, "Number of heads in key/value must divide number of heads in query"
    head_to_kv = torch.arange(heads) // (heads // k.shape[1])
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()[:, head_to_kv]) * scale
    if softcap > 0:  # flash-attn caps the scaled scores: softcap * tanh(s / softcap)
        scores = torch.tanh(scores / softcap) * softcap
    i = torch.arange(sq)[:, None]
    shift = seqlen_k - sq
    keep = torch.ones(sq, seqlen_k, dtype=torch.bool)
    left, right = window_size
    if causal:
        right = 0
    if left >= 0:
        keep &= j[None, :] >= i + shift - left
    if right >= 0:
        keep &= j[None, :] <= i + shift + right
    probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.einsum("hqk,khd->qhd", probs, v.double()[:, head_to_kv]).to(q.dtype)


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
):
    calls.append("varlen")
    _check_qkv(q, k, v)
    _check_int32_vector(cu_seqlens_q, "cu_seqlens_q", q.device)
    _check_int32_vector(cu_seqlens_k, "cu_seqlens_k", q.device)
    _check_scalars(softmax_scale, max_seqlen_q, max_seqlen_k)
    assert q.dim() == 3, "q must be [total_q, H, D]"
    assert dropout_p == 0.0 and alibi_slopes is None and not return_attn_probs
    assert block_table is not None, "this stand-in covers the paged path only"
    batch = cu_seqlens_q.numel() - 1
    _check_paged(k, v, block_table, batch)
    assert q.shape[0] == int(cu_seqlens_q[-1]), "total_q must match cu_seqlens_q"
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out = torch.empty_like(q)
    for b in range(batch):
        qa, qb = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        sk = int(cu_seqlens_k[b + 1] - cu_seqlens_k[b])
        assert qb - qa <= max_seqlen_q and sk <= max_seqlen_k, "max_seqlen must bound every sequence"
        assert -(-sk // k.shape[1]) <= block_table.shape[1], "block_table too short"
        out[qa:qb] = _attend(q[qa:qb], k, v, block_table[b], sk, scale, causal, tuple(window_size), softcap)
    return out


def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens=None,
    cache_batch_idx=None,
    cache_leftpad=None,
    block_table=None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    rotary_interleaved=True,
    alibi_slopes=None,
    num_splits=0,
    return_softmax_lse=False,
):
    calls.append("kvcache")
    _check_qkv(q, k_cache, v_cache)
    _check_scalars(softmax_scale)
    assert (
        k is None and v is None and rotary_cos is None and cache_batch_idx is None and cache_leftpad is None
    )
    assert q.dim() == 4, "q must be [batch, seqlen, H, D]"
    batch = q.shape[0]
    assert block_table is not None, "this stand-in covers the paged path only"
    _check_paged(k_cache, v_cache, block_table, batch)
    _check_int32_vector(cache_seqlens, "cache_seqlens", q.device)
    assert cache_seqlens.shape == (batch,)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out = torch.empty_like(q)
    for b in range(batch):
        sk = int(cache_seqlens[b])
        out[b] = _attend(
            q[b], k_cache, v_cache, block_table[b], sk, scale, causal, tuple(window_size), softcap
        )
    return out
