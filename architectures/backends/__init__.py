"""Attention backends of the paged cache, chosen once per model at Load and reported in ModelInfo.

- `torch`: gather + scaled_dot_product_attention; any device, dtype and block size; the reference.
- `flash_attn`: the flash-attn package (FlashAttention-2) on CUDA in fp16/bf16 with a block size
  that is a multiple of 256; a Load that names no block size gets 256 where flash_attn runs (the
  backend's preferred block size; elsewhere the default is 16).
- `triton`: our Triton kernels (triton_kernels.py): CUDA in fp16/bf16/fp32, any block size; on the
  CPU only when named, under TRITON_INTERPRET=1 (the tests' proof of the kernels).
- `auto`: the available backend of highest priority: flash_attn where it can run, else triton on
  CUDA, else torch.

`register_builtin_backends` is the one list of backends: the worker's registry gets it through
`architectures.register_builtin`, and `BACKENDS` (for direct use: tests, bench, builders called
without a load plan) is filled by the same function. Adding a backend is one `register` line there
(name, lazy factory, probe, priority, optionally a preferred block size). Nothing here imports
flash_attn or triton or touches CUDA at import time; a factory imports its package when its backend
is selected.
"""

from __future__ import annotations

import torch

from registry.backends import BackendRegistry, BackendRequirements

from .flash_backend import (
    FLASH_BLOCK_MULTIPLE,
    FlashAttnBackend,
    flash_attn_probe,
    flash_attn_unavailable_reason,
)
from .protocol import AttentionBackend
from .torch_backend import TorchBackend
from .triton_backend import TritonBackend, triton_unavailable_reason


def triton_probe(requirements: BackendRequirements) -> str | None:
    return triton_unavailable_reason(requirements.device, requirements.dtype)


def triton_auto_probe(requirements: BackendRequirements) -> str | None:
    """`auto` takes triton on CUDA only: on the CPU it is the interpreter, a test mode."""
    if requirements.device.type != "cuda":
        return "auto picks triton on CUDA only"
    return triton_probe(requirements)


def register_builtin_backends(backends: BackendRegistry[AttentionBackend]) -> None:
    backends.register("torch", TorchBackend, priority=0)
    # Block size 256 by default where flash_attn runs: its paged cache needs a multiple of 256.
    backends.register(
        "flash_attn", FlashAttnBackend, flash_attn_probe, priority=100, block_size=FLASH_BLOCK_MULTIPLE
    )
    backends.register("triton", TritonBackend, triton_probe, priority=50, auto_probe=triton_auto_probe)


BACKENDS: BackendRegistry[AttentionBackend] = BackendRegistry()
register_builtin_backends(BACKENDS)


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
    return BACKENDS.select(name, BackendRequirements(torch.device(device), dtype, block_size, head_dim))


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run on this machine (for Info): torch always, flash_attn and triton with CUDA
    and their packages. Dtype and block size are per model and decided at Load."""
    return BACKENDS.available(torch.device(device) if device is not None else torch.device("cuda"))


__all__ = [
    "BACKENDS",
    "AttentionBackend",
    "FlashAttnBackend",
    "TorchBackend",
    "TritonBackend",
    "available_backends",
    "flash_attn_unavailable_reason",
    "register_builtin_backends",
    "select_backend",
    "triton_unavailable_reason",
]
