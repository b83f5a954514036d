"""Backend selection at Load, the lazy flash_attn import, and the flash backend's calls into
flash-attn (run here against a CPU stand-in written from flash-attn's documented contract)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from architectures.backends import (
    FlashAttnBackend,
    TorchBackend,
    available_backends,
    flash_attn_unavailable_reason,
    select_backend,
)
from architectures.paged import PagedKvCache
from registry.errors import InvalidArgument

from . import fake_flash_attn
from .reference import PagedSim

HAS_CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("name", ["torch", "auto", "", "AUTO", " torch "])
def test_cpu_selects_torch(name: str) -> None:
    backend = select_backend(name, device=torch.device("cpu"), dtype=torch.float32, block_size=16)
    assert isinstance(backend, TorchBackend) and backend.name == "torch"


def test_unknown_backend_lists_the_valid_ones() -> None:
    with pytest.raises(
        InvalidArgument,
        match=r"attention_backend 'xformers' is not known \(valid: auto, torch, flash_attn, triton\)",
    ):
        select_backend("xformers", device="cpu", dtype=torch.float32, block_size=16)


@pytest.mark.parametrize(
    ("device", "dtype", "block_size", "head_dim", "reason"),
    [
        ("cpu", torch.bfloat16, 256, None, "it needs a CUDA device, and the model is on cpu"),
        ("cuda", torch.float32, 256, None, "it needs float16 or bfloat16, and the model's dtype is float32"),
        ("cuda", torch.bfloat16, 16, None, "kv_cache.block_size 16 is not a multiple of 256"),
        ("cuda", torch.float16, 384, None, "kv_cache.block_size 384 is not a multiple of 256"),
        ("cuda", torch.float16, 512, 12, "head_dim 12 is not a multiple of 8 up to 256"),
    ],
)
def test_explicit_flash_attn_says_why_it_cannot_run(device, dtype, block_size, head_dim, reason) -> None:
    assert reason in flash_attn_unavailable_reason(torch.device(device), dtype, block_size, head_dim)
    with pytest.raises(InvalidArgument, match="attention_backend flash_attn cannot run: ") as info:
        select_backend("flash_attn", device=device, dtype=dtype, block_size=block_size, head_dim=head_dim)
    assert reason in str(info.value)
    # auto never fails: it falls back to the reference backend
    auto = select_backend("auto", device=device, dtype=dtype, block_size=block_size, head_dim=head_dim)
    assert auto.name == "torch"


@pytest.mark.skipif(HAS_CUDA, reason="checks the message on a machine without CUDA")
def test_flash_attn_without_cuda() -> None:
    with pytest.raises(InvalidArgument, match="CUDA is not available on this machine"):
        select_backend("flash_attn", device="cuda", dtype=torch.bfloat16, block_size=256)
    assert available_backends() == ["torch"]
    assert available_backends("cpu") == ["torch"]


def test_importing_touches_neither_flash_attn_nor_cuda() -> None:
    code = (
        "import sys, torch\n"
        "import architectures.paged, architectures.backends\n"
        "from architectures.backends import select_backend\n"
        "select_backend('auto', device='cpu', dtype=torch.float32, block_size=256)\n"
        "assert 'flash_attn' not in sys.modules, 'flash_attn imported'\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.fixture
def stand_in_flash(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_attn)
    fake_flash_attn.calls.clear()
    return fake_flash_attn


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(6, 2), (4, 4)])
def test_flash_backend_calls_match_the_reference(stand_in_flash, num_heads: int, num_kv_heads: int) -> None:
    """Prefill, decode (flash_attn_with_kvcache), chunked and prefix-cached prefill and a mixed batch
    (flash_attn_varlen_func with block_table), full attention and a window, GQA and not."""
    cache = PagedKvCache(2, 12, 256, num_kv_heads, 8, torch.float32, "cpu")
    sim = PagedSim(cache, FlashAttnBackend(), num_heads, windows=[None, 70], seed=num_heads)
    errors = {
        "prefill": sim.step([(0, 300), (1, 20), (2, 513)]),
        "decode": sim.step([(0, 1), (1, 1), (2, 1)], is_prefill=False),
        "decode-shaped prefill": sim.step([(0, 1), (1, 1)], is_prefill=True),
    }
    sim.release(1)
    sim.fork(2, 3, blocks=2)
    errors["prefix-cached prefill"] = sim.step([(0, 9), (3, 6)])
    errors["mixed"] = sim.step([(2, 1), (4, 40), (3, 1)])
    assert max(errors.values()) <= 1e-5, errors
    assert stand_in_flash.calls == ["varlen"] * 2 + ["kvcache"] * 4 + ["varlen"] * 4


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_available_backends_on_cuda() -> None:
    names = available_backends()
    assert names[0] == "torch"
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        assert "flash_attn" not in names
    else:
        assert "flash_attn" in names
    assert "triton" in names
