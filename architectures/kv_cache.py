"""Dense attention contexts: stateless `forward` and the contiguous per-row cache of
`forward_with_cache` (rows [0, batch), tokens [0, max_seq_len) per row)."""

from __future__ import annotations

import torch

from .lazy_zeros import zeros as lazy_zeros
from .softcap import attention


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Bool [len(q_pos), len(k_pos)]: causal, and within the window when there is one."""
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed &= k_pos[None, :] > q_pos[:, None] - window
    return allowed


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_start: int,
    window: int | None,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """q [B, H, Sq, D] at key indices [q_start, q_start + Sq); k/v [B, Hkv, Sk, D] → [B, H, Sq, D].

    Causality and the window are by index in the row, as in the reference implementation.
    """
    sq, sk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if window is None and q_start == 0 and sq == sk:
        return attention(q, k, v, None, scale, softcap, is_causal=True, enable_gqa=gqa)
    if window is None and sq == 1:
        # One query sees every key: the G query heads that share a KV head become its G queries (no
        # K/V repeat; SDPA over [B, Hkv, G, D] took 25 µs on SmolLM2 where enable_gqa took 37), as
        # the paged backend attends.
        b, heads, _, d = q.shape
        hkv = k.shape[1]
        out = attention(q.reshape(b, hkv, heads // hkv, d), k, v, None, scale, softcap)
        return out.reshape(b, heads, 1, d)  # CUDA's memory-efficient kernel gives non-contiguous output
    q_pos = torch.arange(q_start, q_start + sq, device=q.device)
    k_pos = torch.arange(sk, device=q.device)
    mask = window_mask(q_pos, k_pos, window)
    return attention(q, k, v, mask, scale, softcap, enable_gqa=gqa)


class DenseContext:
    """Stateless causal attention over the call's own tokens; no cache is touched."""

    def attend(self, layer_idx, q, k, v, window, scale, softcap=None):
        # [B, S, H, D] → [B, H, S, D] and back
        out = dense_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0, window, scale, softcap
        )
        return out.transpose(1, 2)


class ContiguousKvCache:
    """Per layer K and V of shape [max_batch_size, n_kv_heads, max_seq_len, head_dim].

    `filled[r]` is how many tokens row r holds; a call may write at any start_pos up to it (a
    rewind discards what follows), never beyond it, so no row ever attends over a hole.
    """

    def __init__(
        self,
        num_layers: int,
        max_batch_size: int,
        max_seq_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (max_batch_size, num_kv_heads, max_seq_len, head_dim)
        self.k = [lazy_zeros(shape, dtype, device) for _ in range(num_layers)]
        self.v = [lazy_zeros(shape, dtype, device) for _ in range(num_layers)]
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.filled = [0] * max_batch_size

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def reset(self) -> None:
        for t in self.k + self.v:
            t.zero_()
        self.filled = [0] * self.max_batch_size


class ContiguousContext:
    """Writes the call's K/V at [start_pos, start_pos + S) of rows [0, B) and attends over
    [0, start_pos + S). The caller has validated the ranges."""

    def __init__(self, cache: ContiguousKvCache, start_pos: int) -> None:
        self.cache = cache
        self.start_pos = start_pos

    def attend(self, layer_idx, q, k, v, window, scale, softcap=None):
        batch, seq = q.shape[0], q.shape[1]
        end = self.start_pos + seq
        k_cache, v_cache = self.cache.k[layer_idx], self.cache.v[layer_idx]
        k_cache[:batch, :, self.start_pos : end] = k.transpose(1, 2)
        v_cache[:batch, :, self.start_pos : end] = v.transpose(1, 2)
        out = dense_attention(
            q.transpose(1, 2),
            k_cache[:batch, :, :end],
            v_cache[:batch, :, :end],
            self.start_pos,
            window,
            scale,
            softcap,
        )
        return out.transpose(1, 2)
