"""Linear layers whose weights stay quantized in memory, and the choice of kernel for each.

Every layer computes y = x W^T + b for the W its canonical weight (registry.quantization.formats)
dequantizes to. How:
- Int8Linear: int8 codes [n, k] and one scale per output row. torch._weight_int8pack_mm where
  quantized_kernels.choose_kernel allows it (CPU, bfloat16); otherwise dequantized per call.
- Int4PackedLinear: 4-bit codes repacked once at Load for torch's int4 kernel of the device
  (_weight_int4pack_mm_for_cpu on CPU, _weight_int4pack_mm on CUDA; groups of 32..256 along the input).
  Act-order checkpoints (GPTQ desc_act) have their input columns sorted by group at Load and the
  activations gathered in that order.
- GroupedIntLinear: any bits / groups / zero points / g_idx / additive offsets (GGUF Q4_1); codes stored packed (two per byte at
  4 bits), dequantized per call. Used with float32 activations and where no kernel fits.
- Fp8Linear: float8_e4m3fn codes with per-row, per-column-block scales: torch._scaled_mm on CUDA
  (sm_89+) when there is one scale per row, otherwise dequantized per call.
Which kernel each layer runs (and why shapes matter) is architectures/quantized_kernels.py.

Measured on the development CPU (see DESIGN.md "Quantized weights"): the int8/int4 kernels are fast
with bfloat16 activations only, so quantized models default to bfloat16 on CPU; a Load that asks
for float32 gets float32 activations and exact dequantized weights (slower).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from registry.quantization.formats import Fp8Weight, IntWeight, QuantizedWeight

from .quantized_kernels import (
    CPU_INT4,
    CPU_INT8,
    CUDA_FP8,
    DEQUANTIZE,
    INT4_KERNEL_GROUPS,
    choose_kernel,
    device_capability,
    fp8_scaled_matmul,
    int4_matmul,
    pack_int4_cuda,
)


class QuantizedLinear(nn.Module):
    """Common part: shapes, optional bias (a float parameter loaded like any dense tensor), and the
    fused projections' `shard_sizes` that the weight loader reads for the bias."""

    kind = "quantized"
    kernel = DEQUANTIZE
    # Tensor parallelism: a row-parallel layer's group; its partial output is summed over the ranks
    # before the (whole) bias is added. None: a complete output.
    reduce = None

    def __init__(
        self, in_features: int, out_features: int, bias: bool, shard_sizes: tuple[int, ...] | None = None
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        if shard_sizes is not None:
            self.shard_sizes = shard_sizes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self.matmul(x.reshape(-1, self.in_features))
        if self.reduce is not None:
            y = self.reduce.all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:  # x [m, k] → [m, n]
        return F.linear(x, self.dequantize(x.dtype))

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}, "
            f"kernel={self.kernel}"
        )


class Int8Linear(QuantizedLinear):
    kind = "int8"

    def __init__(
        self,
        w: IntWeight,
        device: torch.device,
        dtype: torch.dtype,
        kernel: str,
        bias: bool,
        shard_sizes=None,
    ):
        n, k = w.shape
        super().__init__(k, n, bias, shard_sizes)
        self.kernel = kernel
        self.register_buffer("weight_int8", (w.q.to(torch.int16) - 128).to(torch.int8).to(device))
        self.register_buffer("scales", w.scales.reshape(n).to(device=device, dtype=dtype))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == CPU_INT8:
            return torch._weight_int8pack_mm(x, self.weight_int8, self.scales)
        return super().matmul(x)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight_int8.to(dtype) * self.scales.to(dtype).unsqueeze(1)


class Int4PackedLinear(QuantizedLinear):
    kind = "int4"

    def __init__(
        self, w: IntWeight, group: int, device: torch.device, kernel: str, bias: bool, shard_sizes=None
    ):
        n, k = w.shape
        super().__init__(k, n, bias, shard_sizes)
        self.kernel = kernel
        q, groups = w.q, w.groups_of_columns()
        perm = None
        if w.g_idx is not None:
            # Act order: sort input columns by group so that every group is a contiguous run.
            perm = torch.argsort(w.g_idx, stable=True)
            q, groups = q[:, perm], groups[perm]
        cols = groups[::group]  # the checkpoint group of each kernel group (kernel groups nest in them)
        scales = w.scales[:, cols]  # [n, k / group]
        # The kernel computes (q - 8) * scale + zero; the formats give (q - z) * scale.
        zeros = (8 - w.zeros[:, cols]) * scales
        if w.offsets is not None:  # GGUF Q4_1: w = d * q + m = (q - 8) * d + (8 * d + m)
            zeros = zeros + w.offsets[:, cols]
        self.group = group
        if kernel == CPU_INT4:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1).to(device)
        else:
            packed = pack_int4_cuda(q, device)
        self.register_buffer("packed", packed)
        self.register_buffer(
            "scales_and_zeros",
            torch.stack([scales.t(), zeros.t()], dim=-1).to(device, torch.bfloat16).contiguous(),
        )
        self.register_buffer("perm", None if perm is None else perm.to(device))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x[:, self.perm]
        return int4_matmul(self.kernel, x, self.packed, self.group, self.scales_and_zeros)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        # Through the kernel itself on an identity: the weight as this layer applies it (for tests).
        eye = torch.eye(self.in_features, dtype=torch.bfloat16, device=self.packed.device)
        w = int4_matmul(self.kernel, eye, self.packed, self.group, self.scales_and_zeros).t()
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.perm, w)
        return w.to(dtype)


class GroupedIntLinear(QuantizedLinear):
    kind = "grouped-int"

    def __init__(self, w: IntWeight, device: torch.device, bias: bool, shard_sizes=None):
        n, k = w.shape
        super().__init__(k, n, bias, shard_sizes)
        self.bits = w.bits
        q = w.q
        if w.bits == 4:
            if k % 2:
                q = F.pad(q, (0, 1))
            q = q[:, 0::2] | (q[:, 1::2] << 4)  # two codes per byte: [n, ceil(k / 2)]
        self.register_buffer("codes", q.contiguous().to(device))
        self.register_buffer("scales", w.scales.to(device))
        self.register_buffer("zeros", w.zeros.to(device))
        self.register_buffer("g_idx", w.groups_of_columns().to(device))
        self.register_buffer("offsets", None if w.offsets is None else w.offsets.to(device))

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        q = self.codes
        if self.bits == 4:
            q = torch.stack([q & 0xF, q >> 4], dim=-1).reshape(q.shape[0], -1)[:, : self.in_features]
        g = self.g_idx
        compute = torch.float32 if dtype == torch.float32 else dtype
        w = (q.to(compute) - self.zeros[:, g].to(compute)) * self.scales[:, g].to(compute)
        if self.offsets is not None:
            w = w + self.offsets[:, g].to(compute)
        return w.to(dtype)


class Fp8Linear(QuantizedLinear):
    kind = "fp8"

    def __init__(self, w: Fp8Weight, device: torch.device, kernel: str, bias: bool, shard_sizes=None):
        n, k = w.shape
        super().__init__(k, n, bias, shard_sizes)
        self.kernel = kernel
        self.block_cols = w.block_cols
        self.register_buffer("weight_fp8", w.weight.contiguous().to(device))
        self.register_buffer("scales", w.scales.to(device))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == CUDA_FP8:  # one scale per row (choose_kernel's "fp8-row")
            return fp8_scaled_matmul(x, self.weight_fp8, self.scales[:, 0])
        return super().matmul(x)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        scales = self.scales.repeat_interleave(self.block_cols, dim=1)[:, : self.in_features]
        compute = torch.float32 if dtype == torch.float32 else dtype
        return (self.weight_fp8.to(compute) * scales.to(compute)).to(dtype)


def int4_kernel_group(w: IntWeight) -> int | None:
    """The kernel group size for a 4-bit weight, or None when no kernel layout fits: kernel groups
    must nest in the checkpoint's groups and every (act-order sorted) group must be whole."""
    n, k = w.shape
    if w.bits != 4 or k % w.group_size:
        return None
    if w.g_idx is not None:
        counts = torch.bincount(w.g_idx, minlength=k // w.group_size)
        if not bool((counts == w.group_size).all()):
            return None
    for g in INT4_KERNEL_GROUPS:
        if w.group_size % g == 0 and k % g == 0:
            return g
    return None


def make_quantized_linear(
    w: QuantizedWeight,
    device: torch.device,
    dtype: torch.dtype,
    bias: bool,
    shard_sizes: tuple[int, ...] | None = None,
) -> QuantizedLinear:
    """The fastest exact-to-the-format layer for this weight, device and activation dtype."""
    n, k = w.shape
    capability = device_capability(device)
    if isinstance(w, Fp8Weight):
        kind = "fp8-row" if w.block_cols >= k else "fp8-block"
        kernel = choose_kernel(kind, n, k, device.type, dtype, capability)
        return Fp8Linear(w, device, kernel, bias, shard_sizes)
    per_row = w.g_idx is None and w.group_size == k
    if w.bits == 8 and per_row and bool((w.zeros == 128).all()):
        kernel = choose_kernel("int8-row", n, k, device.type, dtype, capability)
        return Int8Linear(w, device, dtype, kernel, bias, shard_sizes)
    group = int4_kernel_group(w)
    kernel = choose_kernel("int4", n, k, device.type, dtype, capability, int4_group=group)
    if kernel != DEQUANTIZE and group is not None:
        return Int4PackedLinear(w, group, device, kernel, bias, shard_sizes)
    return GroupedIntLinear(w, device, bias, shard_sizes)


def resident_totals(network: nn.Module) -> tuple[int, int]:
    """(bytes, parameters) of a network: unique parameters and buffers as they sit in memory; a
    quantized layer counts its logical in × out weights as parameters."""
    total_bytes = total = 0
    seen: set[int] = set()
    for module in network.modules():
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if id(t) in seen:
                continue
            seen.add(id(t))
            total_bytes += t.numel() * t.element_size()
            if isinstance(t, nn.Parameter):
                total += t.numel()
        if isinstance(module, QuantizedLinear):
            total += module.in_features * module.out_features
    return total_bytes, total
