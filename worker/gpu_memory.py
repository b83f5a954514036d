"""GPU memory without creating CUDA contexts.

`torch.cuda.mem_get_info(i)` creates a CUDA context on device i (~0.5 GB of that GPU's memory) if the
process has none there yet. Info and every metrics scrape ask for all visible GPUs, so a worker on a
`--gpus all` host would claim every GPU's context memory. Devices this process already uses are
read through torch (exact, and the context exists anyway); the others through NVML (nvidia-ml-py,
imported lazily), which reads the driver's numbers without a context. Without NVML an untouched
device reports its total only (free 0, and the description says why).
"""

from __future__ import annotations

import importlib
import logging
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

log = logging.getLogger("modelworker.gpu_memory")

_nvml_lock = threading.Lock()
_nvml: ModuleType | None = None
_nvml_failed: str | None = None


@dataclass(frozen=True)
class GpuMemory:
    total_bytes: int
    free_bytes: int
    source: str  # "torch" | "nvml" | "unknown: <why>"


def has_context(index: int) -> bool:
    """True when this process already has a CUDA context on the device (torch made it)."""
    probe = getattr(torch._C, "_cuda_hasPrimaryContext", None)
    if probe is None:  # a CPU build of torch, or a torch without the probe
        return torch.cuda.is_initialized() and torch.cuda.memory_reserved(index) > 0
    return bool(probe(index))


def nvml() -> ModuleType | None:
    """pynvml, initialised once; None (with the reason kept) when it is missing or has no driver."""
    global _nvml, _nvml_failed
    with _nvml_lock:
        if _nvml is None and _nvml_failed is None:
            try:
                module = importlib.import_module("pynvml")
                module.nvmlInit()
                _nvml = module
            except Exception as exc:  # ImportError, or NVMLError when the driver library is absent
                _nvml_failed = f"{type(exc).__name__}: {exc}"
                log.debug("NVML unavailable: %s", _nvml_failed)
        return _nvml


def _nvml_handle(module: Any, index: int, properties: Any) -> Any:
    """The NVML device of torch's device `index`: by UUID (torch's numbering follows
    CUDA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER, NVML's does not); by index when there is no UUID."""
    uuid = getattr(properties, "uuid", None)
    if uuid is not None:
        return module.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
    return module.nvmlDeviceGetHandleByIndex(index)


def gpu_memory(index: int) -> GpuMemory:
    """Total and free bytes of CUDA device `index`, creating no context on it."""
    if has_context(index):
        free, total = torch.cuda.mem_get_info(index)
        return GpuMemory(int(total), int(free), "torch")
    properties = torch.cuda.get_device_properties(index)  # the runtime's device table: no context
    module = nvml()
    if module is not None:
        try:
            info = module.nvmlDeviceGetMemoryInfo(_nvml_handle(module, index, properties))
            return GpuMemory(int(info.total), int(info.free), "nvml")
        except Exception as exc:
            reason = f"NVML: {type(exc).__name__}: {exc}"
    else:
        reason = f"nvidia-ml-py unavailable ({_nvml_failed})"
    return GpuMemory(int(properties.total_memory), 0, f"unknown: {reason}")


def _reset_for_tests() -> None:
    global _nvml, _nvml_failed
    with _nvml_lock:
        _nvml, _nvml_failed = None, None
