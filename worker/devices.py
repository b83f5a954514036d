"""Devices the worker can place models on, and how much memory each has free."""

from __future__ import annotations

import ctypes
import os
import platform
import re
from dataclasses import dataclass

import torch

from registry.errors import InvalidArgument

from .gpu_memory import gpu_memory

_DEVICE_RE = re.compile(r"cpu|cuda(?::(\d+))?")


@dataclass(frozen=True)
class DeviceMemory:
    name: str
    description: str
    total_bytes: int
    free_bytes: int


def resolve_default_device(setting: str) -> torch.device:
    """The settings' device: `auto` is CUDA when present, else CPU."""
    if setting == "auto":
        return (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
    return parse_device(setting, "device")


def parse_device(text: str, field: str = "device") -> torch.device:
    """`cpu`, `cuda`, `cuda:N` → a device that exists here (`cuda` means the current CUDA device)."""
    m = _DEVICE_RE.fullmatch(text.strip().lower())
    if not m:
        raise InvalidArgument(f"{field} {text!r} is not a device (use cpu, cuda or cuda:N)")
    if text.strip().lower() == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise InvalidArgument(f"{field} {text!r}: CUDA is not available on this worker")
    index = int(m.group(1)) if m.group(1) is not None else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise InvalidArgument(f"{field} {text!r}: this worker has {count} CUDA device(s)")
    return torch.device("cuda", index)


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (Linux); empty elsewhere."""
    out: dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    out[key] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    except OSError:
        pass
    return out


def cpu_memory() -> DeviceMemory:
    info = _meminfo()
    total = info.get("MemTotal", 0)
    free = info.get("MemAvailable", info.get("MemFree", 0))
    if not total and hasattr(os, "sysconf"):
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError):
            pass
    description = f"{platform.machine() or 'cpu'}, {os.cpu_count() or 1} cores"
    return DeviceMemory("cpu", description, total, free)


def cuda_memory(index: int, *, create_context: bool = False) -> DeviceMemory:
    """A GPU's memory. Unless `create_context` (a Load onto it is about to make one anyway), a device
    this process has not used is read through NVML, so Info and scrapes create no CUDA context."""
    name = torch.cuda.get_device_name(index)
    if create_context:
        free, total = torch.cuda.mem_get_info(index)
        return DeviceMemory(f"cuda:{index}", name, int(total), int(free))
    mem = gpu_memory(index)
    if mem.source.startswith("unknown"):
        name = f"{name} (free memory {mem.source})"
    return DeviceMemory(f"cuda:{index}", name, mem.total_bytes, mem.free_bytes)


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return cuda_memory(index, create_context=True).free_bytes
    return cpu_memory().free_bytes


def all_devices() -> list[DeviceMemory]:
    devices = [cpu_memory()]
    if torch.cuda.is_available():
        devices.extend(cuda_memory(i) for i in range(torch.cuda.device_count()))
    return devices


def release_cached_memory(device: torch.device | None, collect: bool = True) -> None:
    """Give cached allocator blocks back after an unload or an out-of-memory error; `collect` first
    frees tensors that only reference cycles keep alive (a full, slow garbage collection)."""
    import gc

    if collect:
        gc.collect()
    if device is not None and device.type == "cuda":
        torch.cuda.empty_cache()
    _trim_host_heap()


def _trim_host_heap() -> None:
    """Hand the heap pages freed by an unload back to the OS. glibc keeps freed memory mapped in its
    arenas, so without this the worker's resident memory stays up to a few models high after Unload."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim  # glibc only
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None
