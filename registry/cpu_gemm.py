"""Which matmul kernel a CPU model's dense float32 linear layers run (`cpu_gemm`, chosen at Load;
the kernels are in architectures/cpu_gemm.py).

- `torch`: `F.linear`, which on x86 builds of torch calls MKL.
- `onednn`: oneDNN's matmul (`torch.ops.mkldnn._linear_pointwise`, the op torch itself uses for
  bfloat16 on CPU). oneDNN picks its kernels by the CPU's instruction sets; MKL by its vendor too.
  On an AMD EPYC (Zen 5, AVX-512, 2 threads) MKL ran the SmolLM2 decode GEMVs at 11 GB/s and a
  512-token prefill's GEMMs at 133 GFLOP/s, oneDNN at 22 GB/s and 327 GFLOP/s.
- `auto`: `onednn` on AMD x86 CPUs; `torch` elsewhere (on Intel Xeon MKL was measured at the memory
  and compute roofline), for other dtypes and on other devices.

The two kernels sum in a different order, so logits differ in the last bits (as between two BLAS
builds); the parity tests check whichever the host resolves against transformers.
"""

from __future__ import annotations

import platform
from functools import cache

import torch

from .errors import InvalidArgument

CPU_GEMMS = ("auto", "torch", "onednn")


@cache
def cpu_vendor() -> str:
    """The CPU vendor id (GenuineIntel, AuthenticAMD, ...); "" where it cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def resolve_cpu_gemm(
    name: str, device: torch.device, dtype: torch.dtype, *, vendor: str | None = None
) -> str:
    """The kernel ("torch" or "onednn") a model loaded with `cpu_gemm=name` runs."""
    if name not in CPU_GEMMS:
        raise InvalidArgument(f"cpu_gemm {name!r} is not one of {', '.join(CPU_GEMMS)}")
    applies = device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
    if name == "torch" or not applies:
        return "torch"
    if name == "onednn":
        return "onednn"
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return "onednn" if x86 and (cpu_vendor() if vendor is None else vendor) == "AuthenticAMD" else "torch"
