"""Which matmul kernels a CPU model's dense float32 linear layers run (`cpu_gemm`, chosen at Load;
the kernels are in architectures/cpu_gemm.py).

A layer multiplies one row (a decode step's GEMV, bound by memory bandwidth) or several (prefill and
batched decode, bound by compute); each has its kernel. `cpu_gemm` names them:

- `torch`: `F.linear` for both, which on x86 builds of torch calls MKL's GEMM.
- `onednn`: oneDNN's matmul for both (`torch.ops.mkldnn._linear_pointwise`, the op torch itself uses
  for bfloat16 on CPU).
- `GEMV+GEMM`, e.g. `mv+onednn`: the first for one row, the second for more. `mv` is `torch.mv`
  (MKL's GEMV), for one row only.
- `auto`: the fastest on this host, measured once per process (below); `torch` for
  other dtypes and on other devices.

Neither wins everywhere, nor by vendor. SmolLM2's decode GEMVs on 2 threads: on an AMD EPYC (Zen 5)
`F.linear` 11 GB/s, oneDNN 22; on one Intel Xeon `F.linear` at the memory's roofline, on another
(AMX, 480 MB L3) `F.linear` 10 GB/s, oneDNN 17, `torch.mv` 25 (the roofline). A 512-token prefill's
GEMMs: oneDNN 2.5× `F.linear` on that EPYC, equal on that Xeon. So `auto` times each GEMV kernel and
each GEMM kernel on weights shaped like a decoder's projections, alternating, and leaves `torch`
(the baseline) for another kernel only when that one takes under `MARGIN` of the baseline's time, so
that a near tie of a quiet measurement does not flip between processes (a busy machine can still
mislead it: pin `cpu_gemm` there). It takes 60–100 ms, once per process.

The kernels sum in different orders, so logits differ in the last bits (as between two BLAS builds);
the parity tests check whichever the host resolves against transformers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import InvalidArgument

CPU_GEMMS = (
    "auto",
    "torch",
    "onednn",
    "mv+torch",
    "mv+onednn",
    "onednn+torch",
    "torch+onednn",
)

# The measurement: products with one row (GEMV) and GEMM_ROWS rows over these weights (12 MiB each:
# out of the cores' L2, as a decoder's weights are), each kernel ROUNDS times, alternating; the first
# round of each is a warmup, and each kernel's fastest pass counts (other work on the machine only
# ever slows a pass down).
CALIBRATION_SHAPES = ((3072, 1024), (1024, 3072))
GEMM_ROWS = 64
CALIBRATION_ROUNDS = 6
MARGIN = 0.9

log = logging.getLogger(__name__)


def cpu_gemm_name(gemv: str, gemm: str) -> str:
    """The `cpu_gemm` value of a pair of kernels: one name when they are the same."""
    return gemv if gemv == gemm else f"{gemv}+{gemm}"


def cpu_gemm_kernels(name: str) -> tuple[str, str]:
    """(GEMV kernel, GEMM kernel) of a resolved `cpu_gemm` value."""
    gemv, _, gemm = name.partition("+")
    return gemv, gemm or gemv


@dataclass(frozen=True)
class GemmCalibration:
    """What `auto` measured: seconds per pass over the calibration weights, per kernel."""

    threads: int
    gemv_seconds: dict[str, float]
    gemm_seconds: dict[str, float]
    megabytes: float
    choice: str

    def describe(self) -> str:
        gemv = ", ".join(f"{k} {s * 1e3:.2f}" for k, s in self.gemv_seconds.items())
        gemm = ", ".join(f"{k} {s * 1e3:.2f}" for k, s in self.gemm_seconds.items())
        return (
            f"{self.choice} (over {self.megabytes:.0f} MB of weights on {self.threads} threads, ms: "
            f"GEMV {gemv}; GEMM of {GEMM_ROWS} rows {gemm})"
        )


def fastest(seconds: dict[str, float]) -> str:
    """The kernel that takes under MARGIN of torch's time, the fastest if several; else torch."""
    best = min(seconds, key=seconds.__getitem__)
    return best if seconds[best] < MARGIN * seconds["torch"] else "torch"


def choose_cpu_gemm(gemv_seconds: dict[str, float], gemm_seconds: dict[str, float]) -> str:
    return cpu_gemm_name(fastest(gemv_seconds), fastest(gemm_seconds))


def _onednn(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise.default(x, weight, None, "none", [], "")


def _mv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.mv(weight, x[0])


def _timed_passes(
    kernels: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
    weights: list[torch.Tensor],
    inputs: list[torch.Tensor],
) -> dict[str, float]:
    """The fastest pass over `weights` per kernel (seconds), the kernels alternating. A kernel that
    fails here (an op missing from this build of torch) is left out; torch's is never missing."""
    passes: dict[str, list[float]] = {k: [] for k in kernels}
    for _ in range(CALIBRATION_ROUNDS):
        for name in list(passes):
            start = time.perf_counter()
            try:
                for x, w in zip(inputs, weights, strict=True):
                    kernels[name](x, w)
            except RuntimeError as exc:
                log.warning("cpu_gemm auto: leaving out %s, which failed: %s", name, exc)
                del passes[name]
                continue
            passes[name].append(time.perf_counter() - start)
    return {k: min(v[1:]) for k, v in passes.items()}


_measured: GemmCalibration | None = None
_measuring = threading.Lock()


def calibrate_cpu_gemm() -> GemmCalibration:
    """The kernels timed on this host, once per process (callers that come while it runs wait for
    it), with the calling thread's intra-op threads: call it first on the thread that runs forwards
    (the worker does, at start), not on a Load thread that runs with one."""
    global _measured
    with _measuring:
        if _measured is None:
            _measured = _measure()
        return _measured


def _measure() -> GemmCalibration:
    threads = torch.get_num_threads()
    weights = [torch.zeros(shape) for shape in CALIBRATION_SHAPES]  # values do not change the time
    onednn = {"onednn": _onednn} if torch.backends.mkldnn.is_available() else {}
    gemv = _timed_passes(
        {"torch": F.linear, **onednn, "mv": _mv}, weights, [torch.ones(1, w.shape[1]) for w in weights]
    )
    gemm = _timed_passes(
        {"torch": F.linear, **onednn}, weights, [torch.ones(GEMM_ROWS, w.shape[1]) for w in weights]
    )
    megabytes = sum(w.numel() * w.element_size() for w in weights) / 1e6
    result = GemmCalibration(threads, gemv, gemm, megabytes, choose_cpu_gemm(gemv, gemm))
    log.info("cpu_gemm auto: %s", result.describe())
    return result


def resolve_cpu_gemm(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """The kernels (a `cpu_gemm` value other than auto) a model loaded with `cpu_gemm=name` runs."""
    if name not in CPU_GEMMS:
        raise InvalidArgument(f"cpu_gemm {name!r} is not one of {', '.join(CPU_GEMMS)}")
    applies = device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
    if name == "torch" or not applies:
        return "torch"
    if name != "auto":
        return name
    return calibrate_cpu_gemm().choice
