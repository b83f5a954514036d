"""Zero-filled cache tensors that cost nothing until used.

On the CPU `torch.zeros` writes every byte at allocation (a 1 GiB KV cache: ~1-2 s and 1 GiB
resident before the first token). An anonymous memory map is zero-filled by the kernel page by page
on first touch, so a cache costs only the pages its tokens reach; freeing the tensor unmaps it.
"""

from __future__ import annotations

import mmap

import torch


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """torch.zeros(shape, dtype, device), lazily committed on the CPU. Raises MemoryError when the
    address space is refused (as torch.zeros would)."""
    device = torch.device(device)
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    numel = torch.Size(shape).numel()
    if numel == 0:
        return torch.zeros(shape, dtype=dtype)
    try:
        buffer = mmap.mmap(-1, numel * dtype.itemsize)
    except OSError as exc:
        raise MemoryError(f"cannot map {numel * dtype.itemsize} bytes: {exc}") from None
    return torch.frombuffer(buffer, dtype=dtype).view(shape)
