"""The per-layer kernel choice (architectures/quantized_kernels.py): every branch as pure logic, then
the layers it builds on awkward shapes, compared with a matmul of the dequantized weight.

torch 2.13's CPU `_weight_int8pack_mm` crashes (SIGSEGV) on this machine for two or more rows when
in_features % 8 != 0, and `_convert_weight_to_int4pack_for_cpu` refuses out_features % 16 != 0: those
shapes must dequantize instead. CUDA paths (marker `gpu`) run on a card only."""

from __future__ import annotations

import pytest
import torch

from architectures.quantized_kernels import (
    CPU_INT4,
    CPU_INT8,
    CUDA_FP8,
    CUDA_INT4,
    DEQUANTIZE,
    choose_kernel,
    cuda_inner_k_tiles,
)
from architectures.quantized_linear import make_quantized_linear
from registry.quantization.formats import quantize_fp8, quantize_int4, quantize_int8

BF16, F32 = torch.bfloat16, torch.float32
H100, A100, T4 = (9, 0), (8, 0), (7, 5)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        # CPU: kernels only for bfloat16 activations and proven shapes.
        (("int8-row", 48, 64, "cpu", BF16), CPU_INT8),
        (("int8-row", 48, 40, "cpu", BF16), DEQUANTIZE),  # in % 16 != 0 (AVX-512 width)
        (("int8-row", 48, 20, "cpu", BF16), DEQUANTIZE),  # in % 8 != 0: SIGSEGV in torch
        (("int8-row", 48, 64, "cpu", F32), DEQUANTIZE),
        (("int4", 48, 128, "cpu", BF16, None, 32), CPU_INT4),
        (("int4", 40, 128, "cpu", BF16, None, 32), DEQUANTIZE),  # out % 16 != 0
        (("int4", 48, 128, "cpu", BF16, None, None), DEQUANTIZE),  # no kernel group fits
        (("int4", 48, 128, "cpu", F32, None, 32), DEQUANTIZE),
        (("fp8-row", 48, 64, "cpu", BF16), DEQUANTIZE),
        (("grouped-8", 48, 64, "cpu", BF16), DEQUANTIZE),
        # CUDA int4: sm_80+, n % 8, k a multiple of the group and of 32.
        (("int4", 40, 128, "cuda", BF16, A100, 32), CUDA_INT4),
        (("int4", 40, 96, "cuda", BF16, H100, 32), CUDA_INT4),
        (("int4", 36, 128, "cuda", BF16, H100, 32), DEQUANTIZE),  # n % 8 != 0
        (("int4", 48, 48, "cuda", BF16, H100, 16), DEQUANTIZE),  # k % 32 != 0
        (("int4", 48, 128, "cuda", BF16, T4, 32), DEQUANTIZE),  # before sm_80
        (("int4", 48, 128, "cuda", torch.float16, H100, 32), DEQUANTIZE),
        (("int4", 48, 128, "cuda", BF16, None, 32), DEQUANTIZE),
        # CUDA fp8: sm_89+, one scale per row, n and k multiples of 16.
        (("fp8-row", 48, 64, "cuda", BF16, (8, 9)), CUDA_FP8),
        (("fp8-row", 48, 64, "cuda", BF16, (8, 6)), DEQUANTIZE),
        (("fp8-row", 40, 64, "cuda", BF16, H100), DEQUANTIZE),
        (("fp8-row", 48, 72, "cuda", BF16, H100), DEQUANTIZE),
        (("fp8-block", 48, 64, "cuda", BF16, H100), DEQUANTIZE),
        # CUDA int8: dequantized per call; other devices always dequantize.
        (("int8-row", 48, 64, "cuda", BF16, H100), DEQUANTIZE),
        (("int4", 48, 128, "mps", BF16, None, 32), DEQUANTIZE),
    ],
)
def test_choose_kernel(args: tuple, expected: str) -> None:
    assert choose_kernel(*args) == expected


def test_cuda_inner_k_tiles() -> None:
    assert [cuda_inner_k_tiles(k) for k in (128, 576, 64, 96, 32, 48)] == [8, 4, 4, 2, 2, None]


def _weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.1


def _check(layer, reference_weight: torch.Tensor, rows: int, device: str = "cpu", tol: float = 2e-2) -> None:
    x = torch.randn(rows, layer.in_features, generator=torch.Generator().manual_seed(1))
    expected = x @ reference_weight.t()
    got = layer(x.to(device, torch.bfloat16)).float().cpu()
    assert float((got - expected).abs().max()) <= tol * float(expected.abs().max())


@pytest.mark.parametrize(
    ("n", "k", "kernel"), [(48, 64, CPU_INT8), (48, 40, DEQUANTIZE), (17, 20, DEQUANTIZE)]
)
def test_int8_layers_on_awkward_input_sizes(n: int, k: int, kernel: str) -> None:
    w = quantize_int8(_weight(n, k))
    layer = make_quantized_linear(w, torch.device("cpu"), BF16, bias=False)
    assert layer.kernel == kernel
    _check(layer, w.dequantize(), rows=5)


@pytest.mark.parametrize(
    ("n", "k", "kernel"), [(48, 128, CPU_INT4), (40, 128, DEQUANTIZE), (24, 96, DEQUANTIZE)]
)
def test_int4_layers_on_awkward_output_sizes(n: int, k: int, kernel: str) -> None:
    w = quantize_int4(_weight(n, k), 32)
    layer = make_quantized_linear(w, torch.device("cpu"), BF16, bias=False)
    assert layer.kernel == kernel
    _check(layer, w.dequantize(), rows=5)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(("n", "k", "group"), [(256, 512, 128), (40, 96, 32), (64, 576, 64)])
def test_cuda_int4_kernel_matches_the_dequantized_weight(n: int, k: int, group: int) -> None:
    cuda = torch.device("cuda")
    if torch.cuda.get_device_capability(cuda) < (8, 0):
        pytest.skip("int4 kernel needs sm_80")
    w = quantize_int4(_weight(n, k), group)
    layer = make_quantized_linear(w, cuda, BF16, bias=False)
    assert layer.kernel == CUDA_INT4
    for rows in (1, 5, 33):
        _check(layer, w.dequantize(), rows, "cuda")


@pytest.mark.gpu
@needs_cuda
def test_cuda_fp8_scaled_mm_matches_the_dequantized_weight() -> None:
    cuda = torch.device("cuda")
    if torch.cuda.get_device_capability(cuda) < (8, 9):
        pytest.skip("fp8 _scaled_mm needs sm_89")
    w = quantize_fp8(_weight(96, 256))
    layer = make_quantized_linear(w, cuda, BF16, bias=False)
    assert layer.kernel == CUDA_FP8
    for rows in (1, 7, 64):  # activations quantized to fp8 per token: a few percent
        _check(layer, w.dequantize(), rows, "cuda", tol=6e-2)


@pytest.mark.gpu
@needs_cuda
def test_cuda_int8_dequantizes_per_call() -> None:
    w = quantize_int8(_weight(48, 40))
    layer = make_quantized_linear(w, torch.device("cuda"), BF16, bias=False)
    assert layer.kernel == DEQUANTIZE
    _check(layer, w.dequantize(), 5, "cuda")
