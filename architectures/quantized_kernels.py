"""Which matmul kernel a quantized layer runs, chosen once per layer from its shape, device, activation
dtype and (on CUDA) compute capability, and the kernels' packing and call conventions.

The choice is pure logic (`choose_kernel`), so every branch is tested on any machine. A kernel is chosen
only for shapes it is known to compute correctly; everything else dequantizes the layer per call.

Constraints, as measured or read from torch's sources (torch 2.13):
- CPU `_weight_int8pack_mm`: crashes (SIGSEGV) with two or more rows when in_features % 8 != 0 on an
  AVX2 CPU (measured here); its vector width is 16 on AVX-512, so in_features % 16 == 0 is required.
- CPU `_convert_weight_to_int4pack_for_cpu` / `_weight_int4pack_mm_for_cpu`: out_features % 16 == 0
  (the packing op refuses other shapes), groups of 32..256 that divide in_features.
- CUDA `_convert_weight_to_int4pack` / `_weight_int4pack_mm` (aten/src/ATen/native/cuda/int4mm.cu):
  compute capability >= 8.0, bfloat16 activations, groups of 32/64/128/256, in_features a multiple of
  inner_k_tiles * 16 (inner_k_tiles 2, 4 or 8), out_features a multiple of 8 (the n tile), weight given
  as uint8 [n, k / 2] with the even column in the high nibble.
- CUDA `_scaled_mm` (fp8): compute capability >= 8.9, row-wise scales (one per token, one per output
  channel) with bfloat16 output, in_features and out_features multiples of 16, the weight column-major.
"""

from __future__ import annotations

import torch

# Kernel names (also what tests and the README table speak of).
CPU_INT8 = "cpu-int8pack"  # torch._weight_int8pack_mm
CPU_INT4 = "cpu-int4pack"  # torch._weight_int4pack_mm_for_cpu
CUDA_INT4 = "cuda-int4pack"  # torch._weight_int4pack_mm
CUDA_FP8 = "cuda-scaled-mm"  # torch._scaled_mm, fp8 activations quantized per token
DEQUANTIZE = "dequantize"  # the layer's weight dequantized per call, then F.linear

INT4_KERNEL_GROUPS = (256, 128, 64, 32)
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)


def choose_kernel(
    weight_kind: str,
    out_features: int,
    in_features: int,
    device_type: str,
    dtype: torch.dtype,
    capability: tuple[int, int] | None = None,
    int4_group: int | None = None,
) -> str:
    """The kernel for one layer.

    weight_kind: "int8-row" (8-bit codes, symmetric, one scale per output row), "int4" (4-bit codes
    in whole groups; `int4_group` the kernel group that nests in the format's groups, None when none
    does), "fp8-row" (float8 with one scale per output row), or anything else (always dequantized).
    """
    n, k = out_features, in_features
    if dtype != torch.bfloat16:  # the kernels take bfloat16 activations (float32 loads stay exact)
        return DEQUANTIZE
    if device_type == "cpu":
        if weight_kind == "int8-row" and k % 16 == 0:
            return CPU_INT8
        if weight_kind == "int4" and int4_group is not None and n % 16 == 0 and k % int4_group == 0:
            return CPU_INT4
        return DEQUANTIZE
    if device_type != "cuda" or capability is None:
        return DEQUANTIZE
    if (
        weight_kind == "int4"
        and capability >= (8, 0)
        and int4_group is not None
        and k % int4_group == 0
        and cuda_inner_k_tiles(k) is not None
        and n % 8 == 0
    ):
        return CUDA_INT4
    if weight_kind == "fp8-row" and capability >= (8, 9) and k % 16 == 0 and n % 16 == 0:
        return CUDA_FP8
    return DEQUANTIZE


def device_capability(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(device)


# -- CUDA int4 ----------------------------------------------------------------------------------


def cuda_inner_k_tiles(k: int) -> int | None:
    """The largest inner k-tile count (8, 4, 2 tiles of 16) that divides in_features."""
    for tiles in (8, 4, 2):
        if k % (tiles * 16) == 0:
            return tiles
    return None


def pack_int4_cuda(q: torch.Tensor, device: torch.device) -> torch.Tensor:
    """4-bit codes uint8 [n, k] (0..15) → the tensor-core layout of `_weight_int4pack_mm`."""
    k = q.shape[1]
    nibbles = ((q[:, 0::2] << 4) | q[:, 1::2]).to(torch.uint8).contiguous()
    return torch.ops.aten._convert_weight_to_int4pack(nibbles.to(device), cuda_inner_k_tiles(k))


def int4_matmul(kernel: str, x: torch.Tensor, packed: torch.Tensor, group: int, sz: torch.Tensor):
    """x [m, k] (any float dtype) through the int4 kernel; y = x ((q - 8) * scale + zero)^T."""
    dtype = x.dtype
    x = x.to(torch.bfloat16).contiguous()
    if kernel == CPU_INT4:
        y = torch._weight_int4pack_mm_for_cpu(x, packed, group, sz)
    else:
        y = torch._weight_int4pack_mm(x, packed, group, sz)
    return y.to(dtype)


# -- CUDA fp8 -----------------------------------------------------------------------------------


def fp8_scaled_matmul(x: torch.Tensor, weight: torch.Tensor, row_scales: torch.Tensor) -> torch.Tensor:
    """x [m, k] → [m, n] with `_scaled_mm`: activations quantized to float8_e4m3fn per token (row-wise
    scales), the weight [n, k] float8 passed transposed (column-major) with one scale per output row."""
    dtype = x.dtype
    amax = x.abs().amax(dim=1, keepdim=True).float().clamp_(min=1e-12)
    x_scale = amax / FP8_MAX
    x_fp8 = (x.float() / x_scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    y = torch._scaled_mm(
        x_fp8,
        weight.t(),
        scale_a=x_scale,
        scale_b=row_scales.reshape(1, -1).float(),
        out_dtype=torch.bfloat16,
    )
    return y.to(dtype)
