"""Which matmul kernel a CPU model's dense float32 linear layers run (`cpu_gemm`, chosen at Load;
the kernels are in architectures/cpu_gemm.py).

- `torch`: `F.linear`, which on x86 builds of torch calls MKL.
- `onednn`: oneDNN's matmul (`torch.ops.mkldnn._linear_pointwise`, the op torch itself uses for
  bfloat16 on CPU).
- `auto`: the faster of the two on this host, measured once per process and thread count (below);
  `torch` for other dtypes and on other devices.

Neither kernel wins everywhere, and not by vendor: on an AMD EPYC (Zen 5) MKL ran SmolLM2's decode
GEMVs at 11 GB/s and oneDNN at 22; on one Intel Xeon MKL ran them at the memory's roofline, on
another (AMX, 480 MB L3) at 10 GB/s against oneDNN's 17. So `auto` measures: a few GEMVs (the
decode step's matmuls, which bound its speed) with each kernel, alternating, over weights shaped like
a decoder's projections; `onednn` only when it takes under `ONEDNN_MARGIN` of torch's time, so that a
near tie never flips between processes. It takes ~20 ms, once.

The two kernels sum in a different order, so logits differ in the last bits (as between two BLAS
builds); the parity tests check whichever the host resolves against transformers.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F

from .errors import InvalidArgument

CPU_GEMMS = ("auto", "torch", "onednn")

# The measurement: one-row GEMVs over these weights (12 MiB each: out of the cores' L2, as a
# decoder's weights are), each kernel ROUNDS times, alternating; the first round of each is a warmup.
CALIBRATION_SHAPES = ((3072, 1024), (1024, 3072))
CALIBRATION_ROUNDS = 5
ONEDNN_MARGIN = 0.9

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GemmCalibration:
    """What `auto` measured: seconds per pass over the calibration weights, per kernel."""

    threads: int
    seconds: dict[str, float]
    megabytes: float
    choice: str

    def describe(self) -> str:
        times = ", ".join(f"{k} {s * 1e3:.2f} ms" for k, s in self.seconds.items())
        return f"{self.choice} (GEMVs over {self.megabytes:.0f} MB on {self.threads} threads: {times})"


def choose_cpu_gemm(seconds: dict[str, float]) -> str:
    """`onednn` when its measured time is under ONEDNN_MARGIN of torch's, else `torch`."""
    return "onednn" if seconds["onednn"] < ONEDNN_MARGIN * seconds["torch"] else "torch"


def _onednn(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise.default(x, weight, None, "none", [], "")


@cache
def calibrate_cpu_gemm(threads: int) -> GemmCalibration:
    """Time both kernels on this host with `threads` intra-op threads (the caller's setting)."""
    weights = [torch.zeros(shape) for shape in CALIBRATION_SHAPES]  # values do not change the time
    inputs = [torch.ones(1, w.shape[1]) for w in weights]
    kernels = {"torch": F.linear, "onednn": _onednn}
    passes: dict[str, list[float]] = {k: [] for k in kernels}
    for _ in range(CALIBRATION_ROUNDS):
        for name, gemm in kernels.items():
            start = time.perf_counter()
            for x, w in zip(inputs, weights, strict=True):
                gemm(x, w)
            passes[name].append(time.perf_counter() - start)
    seconds = {k: statistics.median(v[1:]) for k, v in passes.items()}
    megabytes = sum(w.numel() * w.element_size() for w in weights) / 1e6
    result = GemmCalibration(threads, seconds, megabytes, choose_cpu_gemm(seconds))
    log.info("cpu_gemm auto: %s", result.describe())
    return result


def resolve_cpu_gemm(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """The kernel ("torch" or "onednn") a model loaded with `cpu_gemm=name` runs."""
    if name not in CPU_GEMMS:
        raise InvalidArgument(f"cpu_gemm {name!r} is not one of {', '.join(CPU_GEMMS)}")
    applies = device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
    if name == "torch" or not applies:
        return "torch"
    if name == "onednn":
        return "onednn"
    return calibrate_cpu_gemm(torch.get_num_threads()).choice
