"""Attention backends of the paged cache, chosen once per model at Load and reported in ModelInfo.

- `torch`: gather + scaled_dot_product_attention; any device, dtype and block size; the reference.
- `flash_attn`: the flash-attn package (FlashAttention-2) on CUDA in fp16/bf16 with a block size
  that is a multiple of 256.
- `triton`: our Triton kernels (triton_kernels.py): CUDA in fp16/bf16/fp32, any block size; on the
  CPU only under TRITON_INTERPRET=1 (the tests' proof of the kernels).
- `auto`: flash_attn where it can run, else triton on CUDA, else torch.

Nothing here imports flash_attn or triton or touches CUDA at import time; a backend imports its
package when it is selected.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from registry.errors import InvalidArgument

from .flash_backend import FlashAttnBackend, flash_attn_unavailable_reason
from .torch_backend import TorchBackend
from .triton_backend import TritonBackend, triton_unavailable_reason

BACKEND_NAMES = ("auto", "torch", "flash_attn", "triton")


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
    if requested == "triton":
        why = triton_unavailable_reason(device, dtype)
        if why is not None:
            raise InvalidArgument(f"attention_backend triton cannot run: {why}")
        return TritonBackend()
    reason = flash_attn_unavailable_reason(device, dtype, block_size, head_dim)
    if reason is None:
        return FlashAttnBackend()
    if requested == "flash_attn":
        raise InvalidArgument(f"attention_backend flash_attn cannot run: {reason}")
    if device.type == "cuda" and triton_unavailable_reason(device, dtype) is None:
        return TritonBackend()
    return TorchBackend()


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run on this machine (for Info): torch always, flash_attn with CUDA and the
    package, triton with CUDA and the package. Dtype and block size are per
    model and decided at Load."""
    names = ["torch"]
    cuda = torch.device(device) if device is not None else torch.device("cuda")
    if cuda.type == "cuda" and flash_attn_unavailable_reason(cuda, torch.bfloat16, 256, None) is None:
        names.append("flash_attn")
    if cuda.type == "cuda" and triton_unavailable_reason(cuda, torch.float16) is None:
        names.append("triton")  # on the CPU (the interpreter, for tests) it is not advertised
    return names


__all__ = [
    "BACKEND_NAMES",
    "AttentionBackend",
    "FlashAttnBackend",
    "TorchBackend",
    "TritonBackend",
    "available_backends",
    "flash_attn_unavailable_reason",
    "select_backend",
    "triton_unavailable_reason",
]
