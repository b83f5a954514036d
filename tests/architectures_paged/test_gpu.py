"""GPU checks (marker `gpu`; skipped without CUDA, the flash_attn ones without a usable flash-attn):
the torch backend in bf16 on CUDA against the float64 reference and against CPU float32, and the
flash_attn backend against the torch backend on the same cache. `make gpu-check` runs these."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from architectures import llama
from architectures.backends import FlashAttnBackend, TorchBackend, flash_attn_unavailable_reason
from architectures.paged import PagedKvCache
from registry import KvCacheOptions, LoadOptions
from tests.tiny_models import make_tiny_model_dir

from .reference import PagedSim, Scheduler

pytestmark = pytest.mark.gpu

HAS_CUDA = torch.cuda.is_available()
CUDA = torch.device("cuda") if HAS_CUDA else None
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
FLASH_REASON = (
    flash_attn_unavailable_reason(torch.device("cuda"), torch.bfloat16, 256, 64) if HAS_CUDA else "needs CUDA"
)
needs_flash = pytest.mark.skipif(FLASH_REASON is not None, reason=f"flash_attn: {FLASH_REASON}")

# Attention outputs are averages of unit-variance values: bf16 rounding of the output and of the
# probabilities stays well under this; a wrong mask or block is off by O(1).
ATTN_TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}
LOGITS_REL_TOL = 5e-2  # relative to the largest |logit|: two tiny layers in bf16 against fp32


def _scenario(sim: PagedSim, block_size: int) -> dict[str, float]:
    """Prefill, decode, chunked and prefix-cached prefill, a mixed batch; per step the max error."""
    lengths = [300, 20, 513] if block_size >= 256 else [37, 20, 65]
    err = {"prefill": sim.step([(0, lengths[0]), (1, lengths[1]), (2, lengths[2])])}
    err["decode"] = sim.step([(0, 1), (1, 1), (2, 1)], is_prefill=False)
    err["decode 2"] = sim.step([(2, 1), (0, 1), (1, 1)], is_prefill=False)
    sim.release(1)
    sim.fork(2, 3, blocks=lengths[2] // block_size)
    err["prefix-cached prefill"] = sim.step([(0, 9), (3, 6)])
    err["mixed"] = sim.step([(2, 1), (4, 40), (3, 1)])
    return err


def _cache(block_size: int, dtype: torch.dtype) -> PagedKvCache:
    blocks = 24 if block_size >= 256 else 64
    return PagedKvCache(2, blocks, block_size, 2, 64, dtype, CUDA)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [16, 256])
def test_torch_backend_on_cuda_matches_reference(block_size: int, dtype: torch.dtype) -> None:
    sim = PagedSim(_cache(block_size, dtype), TorchBackend(), 8, windows=[None, 50], seed=block_size)
    err = _scenario(sim, block_size)
    assert max(err.values()) <= ATTN_TOL[dtype], err


@needs_flash
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("num_heads", "window"), [(8, None), (8, 50), (2, 50)])
def test_flash_backend_matches_torch_backend_on_the_same_cache(
    dtype: torch.dtype, num_heads: int, window: int | None
) -> None:
    sim = PagedSim(
        _cache(256, dtype),
        FlashAttnBackend(),
        num_heads,
        windows=[None, window],
        seed=num_heads,
        compare_backend=TorchBackend(),
    )
    err = _scenario(sim, 256)
    assert max(err.values()) <= ATTN_TOL[dtype], err
    assert sim.backend_diff <= ATTN_TOL[dtype], f"flash_attn vs torch: {sim.backend_diff}"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    # head_dim 16 (hidden 64, 4 heads, 2 KV heads), long enough positions for 256-token blocks.
    return make_tiny_model_dir(
        tmp_path_factory.mktemp("gpu-llama"), "llama", seed=3, max_position_embeddings=1024
    )


def _load(model_dir: Path, device: torch.device, dtype: torch.dtype, backend: str):
    options = LoadOptions(
        dtype=dtype, attention_backend=backend, kv_cache=KvCacheOptions(block_size=256, num_blocks=16)
    )
    return llama.build(model_dir, device, options)


def _same_calls(models: list, seed: int) -> float:
    """Drive every model with the same calls; the largest relative logit difference to models[0]."""
    sched = Scheduler(models[0], seed=seed)
    steps = [
        ([(0, 300), (1, 20), (2, 270)], True),
        ([(0, 1), (1, 1), (2, 1)], False),
        ([(1, 30), (2, 1), (3, 5)], True),
        ([(0, 1), (1, 1), (2, 1), (3, 1)], False),
    ]
    worst = 0.0
    for requests, is_prefill in steps:
        call, _ = sched.build(requests, is_prefill)
        ref = models[0].forward_paged(**call, all_logits=True).cpu()
        for other in models[1:]:
            got = other.forward_paged(**call, all_logits=True).cpu()
            worst = max(worst, float((got - ref).abs().max() / ref.abs().max()))
    return worst


@needs_cuda
def test_model_on_cuda_bf16_matches_cpu_fp32(llama_dir: Path) -> None:
    cpu = _load(llama_dir, torch.device("cpu"), torch.float32, "torch")
    gpu = _load(llama_dir, CUDA, torch.bfloat16, "torch")
    assert _same_calls([cpu, gpu], seed=1) <= LOGITS_REL_TOL


@needs_flash
def test_model_flash_attn_matches_torch_backend(llama_dir: Path) -> None:
    ref = _load(llama_dir, torch.device("cpu"), torch.float32, "torch")
    torch_bf16 = _load(llama_dir, CUDA, torch.bfloat16, "torch")
    flash_bf16 = _load(llama_dir, CUDA, torch.bfloat16, "auto")
    assert flash_bf16.attention_backend == "flash_attn"
    assert _same_calls([ref, torch_bf16, flash_bf16], seed=2) <= LOGITS_REL_TOL
    assert _same_calls([torch_bf16, flash_bf16], seed=3) <= LOGITS_REL_TOL
