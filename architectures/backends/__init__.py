"""Attention backends of the paged cache, chosen once per model at Load and reported in ModelInfo.

- `torch`: gather + scaled_dot_product_attention; any device, dtype and block size; the reference.
- `flash_attn`: the flash-attn package (FlashAttention-2) on CUDA in fp16/bf16 with a block size
  that is a multiple of 256.
- `auto`: flash_attn where it can run, torch elsewhere.

Nothing here imports flash_attn or touches CUDA at import time; the flash backend imports the
package when it is selected.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from registry.errors import InvalidArgument

from .flash_backend import FLASH_BLOCK_MULTIPLE, FlashAttnBackend, flash_attn_unavailable_reason
from .torch_backend import TorchBackend

BACKEND_NAMES = ("auto", "torch", "flash_attn")


class AttentionBackend(Protocol):
    """What `PagedContext` needs from a backend. `plan` runs once per call, `attend` once per layer,
    after the layer's K/V are in the cache."""

    name: str

    def plan(self, cache: Any, batch: Any) -> Any: ...

    def attend(
        self,
        cache: Any,
        layer_idx: int,
        q: torch.Tensor,
        batch: Any,
        plan: Any,
        window: int | None,
        scale: float,
    ) -> torch.Tensor: ...


def select_backend(
    name: str,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    block_size: int,
    head_dim: int | None = None,
) -> AttentionBackend:
    """The backend for a model at Load. `auto` (or an empty name) never fails; naming a backend that
    cannot run here raises InvalidArgument saying why."""
    requested = (name or "auto").strip().lower()
    if requested not in BACKEND_NAMES:
        raise InvalidArgument(f"attention_backend {name!r} is not known (valid: {', '.join(BACKEND_NAMES)})")
    device = torch.device(device)
    if requested == "torch":
        return TorchBackend()
    reason = flash_attn_unavailable_reason(device, dtype, block_size, head_dim)
    if reason is None:
        return FlashAttnBackend()
    if requested == "flash_attn":
        raise InvalidArgument(f"attention_backend flash_attn cannot run: {reason}")
    return TorchBackend()


SMALL_BLOCK_SIZE = 16  # the default where flash-attn does not run: little waste per sequence


def default_block_size(
    backend: str, *, device: torch.device | str, dtype: torch.dtype, head_dim: int | None
) -> int:
    """The KV block size of a Load that names none: FLASH_BLOCK_MULTIPLE (256) where the backend
    asked for (`auto` or `flash_attn`) would then run flash-attn, whose paged cache needs a multiple
    of 256; SMALL_BLOCK_SIZE elsewhere. The one place this choice is made (the Load's admission
    check and the model's cache use it alike)."""
    requested = (backend or "auto").strip().lower()
    if requested not in ("auto", "flash_attn"):
        return SMALL_BLOCK_SIZE
    reason = flash_attn_unavailable_reason(torch.device(device), dtype, FLASH_BLOCK_MULTIPLE, head_dim)
    return FLASH_BLOCK_MULTIPLE if reason is None else SMALL_BLOCK_SIZE


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run on this machine (for Info): torch always, flash_attn with CUDA and the
    package. Dtype and block size are per model and decided at Load."""
    names = ["torch"]
    cuda = torch.device(device) if device is not None else torch.device("cuda")
    if cuda.type == "cuda" and flash_attn_unavailable_reason(cuda, torch.bfloat16, 256, None) is None:
        names.append("flash_attn")
    return names


__all__ = [
    "BACKEND_NAMES",
    "AttentionBackend",
    "FlashAttnBackend",
    "TorchBackend",
    "available_backends",
    "default_block_size",
    "flash_attn_unavailable_reason",
    "select_backend",
]
