"""The matmul kernels of dense linear layers (`cpu_gemm`; registry/cpu_gemm.py says which a Load
takes and why): `Linear` multiplies with the kernel `use_gemm` gives it at Load, which for a
`GEMV+GEMM` pair sends one-row inputs (a decode step) to the first and the rest to the second.

oneDNN's matmul costs 13–24 µs a call whatever the size (primitive lookup, its own parallel region;
measured on 2 threads against MKL's 3.5 µs for a 64×64 GEMV), which its faster loops pay back only on
larger weights: layers below `KERNEL_MIN_WEIGHT` elements keep F.linear whatever the kernel (a tiny
model's decode step took 0.67 ms instead of 0.43 ms with every layer on oneDNN)."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from registry.cpu_gemm import cpu_gemm_kernels

Gemm = Callable[..., torch.Tensor]


def _linear_pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise.default(x, weight, bias, "none", [], "")


@torch.library.custom_op("modelworker::onednn_linear", mutates_args=())
def _opaque_onednn_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The same op, opaque to torch.compile: inductor's lowering of the raw op expects a weight
    prepacked at compile time, which weights updated in place (UpdateWeights) cannot be."""
    return _linear_pointwise(x, weight, bias)


@_opaque_onednn_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear through oneDNN (float32 CPU tensors)."""
    if torch.compiler.is_compiling():
        return _opaque_onednn_linear(x, weight, bias)
    return _linear_pointwise(x, weight, bias)


def mv_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear of a one-row x ([..., in] with one row in all) through torch.mv (MKL's GEMV).

    Under torch.compile it stays torch.mv, which inductor turns into GEMV loops of its own, fused
    with their neighbours: SmolLM2's compiled step took 26.8 ms that way on an Intel Xeon against
    29.9 ms with MKL's GEMV as an opaque op (the op's Python dispatch cost ~12 µs a call)."""
    flat = x.reshape(-1)
    y = torch.mv(weight, flat) if bias is None else torch.addmv(bias, weight, flat)
    return y.view(*x.shape[:-1], weight.shape[0])


GEMMS: dict[str, Gemm] = {"torch": F.linear, "onednn": onednn_linear}
GEMVS: dict[str, Gemm] = {**GEMMS, "mv": mv_linear}

# 1 MiB of float32: SmolLM2's o_proj (576×576) and larger. Its decode step ran at the same speed with
# this bound as with every layer on oneDNN; the lm_head alone gives most of the gain.
KERNEL_MIN_WEIGHT = 1 << 18


@cache
def kernel(name: str) -> Gemm:
    """The matmul of a resolved `cpu_gemm` value (one function per name: layers share it)."""
    gemv_name, gemm_name = cpu_gemm_kernels(name)
    if gemv_name == gemm_name:
        return GEMMS[gemm_name]
    gemv, gemm = GEMVS[gemv_name], GEMMS[gemm_name]

    def by_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return gemv(x, weight, bias) if x.numel() == x.shape[-1] else gemm(x, weight, bias)

    by_rows.__name__ = by_rows.__qualname__ = f"{gemv_name}_or_{gemm_name}_linear"
    return by_rows


class Linear(nn.Linear):
    """nn.Linear whose matmul is its model's kernel (set at Load by `use_gemm`)."""

    gemm: Gemm = staticmethod(F.linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gemm(x, self.weight, self.bias)


def gemm_for(name: str, weight: torch.Tensor) -> Gemm:
    """The matmul a layer with `weight` runs under `cpu_gemm` `name`: F.linear below KERNEL_MIN_WEIGHT."""
    return kernel(name) if weight.numel() >= KERNEL_MIN_WEIGHT else F.linear


def use_gemm(network: nn.Module, name: str) -> None:
    """The dense `Linear`s of `network` multiply with the kernels of `name` (see gemm_for; quantized layers are
    not `Linear`s and keep their own kernels)."""
    for module in network.modules():
        if isinstance(module, Linear):
            module.gemm = gemm_for(name, module.weight)
