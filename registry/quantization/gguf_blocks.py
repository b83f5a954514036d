"""llama.cpp's Q4_0, Q4_1 and Q8_0 blocks, kept as they are: split into codes and per-32 scales (and
Q4_1's offsets) by `modelworker import-gguf --keep-quant`, and read back as an IntWeight that
dequantizes to exactly what the `gguf` package's dequantization gives (same float32 operations).

ggml blocks of 32 weights along a row (the input dimension):
- Q4_0: f16 d, 16 bytes of nibbles; w = d * (q - 8).
- Q4_1: f16 d, f16 m, 16 bytes of nibbles; w = d * q + m.
- Q8_0: f16 d, 32 int8; w = d * q.
In a Q4 block, byte j holds weight j in its low nibble and weight j + 16 in its high one.

Our checkpoint tensors per layer (`<layer>.gguf_codes` marks a kept layer):
- gguf_codes: uint8 [n, k / 2] for Q4 (weight 2i in the low nibble of byte i, 2i + 1 in the high one),
  uint8 [n, k] for Q8_0 (q + 128);
- gguf_scales: F16 [n, k / 32] (d); gguf_mins: F16 [n, k / 32] (m, Q4_1 only).
"""

from __future__ import annotations

import numpy as np
import torch

from .formats import GGUF_GROUP, GGUF_TENSORS, IntWeight

__all__ = ["GGUF_BITS", "GGUF_GROUP", "GGUF_TENSORS", "gguf_weight", "split_blocks", "unpack_nibbles"]
GGUF_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}  # the block types a layer can keep
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


def split_blocks(block_type: str, raw: np.ndarray, n: int, k: int) -> dict[str, np.ndarray]:
    """A GGUF tensor's bytes (uint8, n rows of k / 32 blocks) → our tensors {suffix: array}."""
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n, k // GGUF_GROUP, _BLOCK_BYTES[block_type])
    out = {"gguf_scales": blocks[..., 0:2].copy().view(np.float16).reshape(n, -1)}
    if block_type == "Q8_0":
        out["gguf_codes"] = (blocks[..., 2:] ^ np.uint8(0x80)).reshape(n, k)  # int8 q → q + 128
        return out
    start = 2
    if block_type == "Q4_1":
        out["gguf_mins"] = blocks[..., 2:4].copy().view(np.float16).reshape(n, -1)
        start = 4
    nibbles = blocks[..., start:]  # [n, blocks, 16]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).reshape(n, k)  # weights in order
    out["gguf_codes"] = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)
    return out


def unpack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [n, k / 2] → uint8 [n, k] (low nibble first)."""
    return torch.stack([codes & 0x0F, codes >> 4], dim=-1).reshape(codes.shape[0], -1)


def gguf_weight(
    block_type: str, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None
) -> IntWeight:
    """The canonical weight: Q4_0 (q - 8) * d, Q4_1 (q - 0) * d + m, Q8_0 ((q + 128) - 128) * d."""
    d = scales.float().contiguous()
    if block_type == "Q8_0":
        return IntWeight(8, codes.contiguous(), d, torch.full_like(d, 128.0), GGUF_GROUP)
    q = unpack_nibbles(codes).contiguous()
    if block_type == "Q4_0":
        return IntWeight(4, q, d, torch.full_like(d, 8.0), GGUF_GROUP)
    return IntWeight(4, q, d, torch.zeros_like(d), GGUF_GROUP, offsets=mins.float().contiguous())
