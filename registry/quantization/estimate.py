"""Resident weight bytes of a quantized Load, from the checkpoint's headers (admission control)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..safetensors_loader import index_checkpoint

_LAYER_MATRIX = re.compile(r"\.layers\.\d+\..*\.weight$")


def estimate_quantized_bytes(model_dir: Path, dtype: torch.dtype, quantization: str) -> int:
    """Bytes once loaded: a quantized checkpoint keeps its integer and float8 tensors as stored
    (floating scales and dense tensors convert to `dtype`); an on-the-fly `int8`/`int4`/`fp8` Load
    stores the decoder layers' matrices at 1 or 1/2 byte per weight plus about 3% for scales."""
    bits = {"int8": 8, "fp8": 8, "int4": 4}.get(quantization)
    total = 0
    for entry in index_checkpoint(model_dir).values():
        floating = entry.dtype.is_floating_point and entry.dtype.itemsize > 1
        if bits is not None and len(entry.shape) == 2 and _LAYER_MATRIX.search(entry.name):
            total += entry.numel * bits // 8 + entry.numel // 32
        elif floating:
            total += entry.numel * dtype.itemsize
        else:
            total += entry.nbytes
    return total
