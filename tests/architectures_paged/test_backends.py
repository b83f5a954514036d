"""Backend selection at Load, the lazy flash_attn import, and the flash backend's calls into
flash-attn (run here against a CPU stand-in written from flash-attn's documented contract)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from architectures.backends import (
    BACKENDS,
    FlashAttnBackend,
    TorchBackend,
    available_backends,
    flash_attn_unavailable_reason,
    select_backend,
)
from architectures.paged import PagedKvCache
from registry import BackendRequirements, KvCacheOptions, LoadOptions, LoadPlan, ModelConfig
from registry.errors import InvalidArgument
from registry.load_plan import default_block_size, make_load_plan

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


# bf16 keeps 8 mantissa bits: the output (an average of unit-variance values, |out| < ~3) is
# rounded once, to within ~1e-2 of the float64 reference; a wrong mask or block is off by O(1).
HALF_TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(6, 2), (4, 4)])
def test_flash_backend_calls_match_the_reference(
    stand_in_flash, dtype: torch.dtype, num_heads: int, num_kv_heads: int
) -> None:
    """Prefill, decode (flash_attn_with_kvcache), chunked and prefix-cached prefill and a mixed batch
    (flash_attn_varlen_func with block_table), full attention and a window, GQA and not; in the half
    dtypes flash-attn takes, against the float64 reference."""
    cache = PagedKvCache(2, 12, 256, num_kv_heads, 8, dtype, "cpu")
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
    assert max(errors.values()) <= HALF_TOL[dtype], errors
    assert stand_in_flash.calls == ["varlen"] * 2 + ["kvcache"] * 4 + ["varlen"] * 4


def _varlen_args(**changes):
    """Valid arguments of one paged flash_attn_varlen_func call (bf16, head_dim 64), with changes."""
    q = torch.randn(5, 4, 64, dtype=torch.bfloat16)
    cache = torch.zeros(2, 256, 2, 64, dtype=torch.bfloat16)
    args = dict(
        q=q,
        k=cache,
        v=cache.clone(),
        cu_seqlens_q=torch.tensor([0, 5], dtype=torch.int32),
        cu_seqlens_k=torch.tensor([0, 5], dtype=torch.int32),
        max_seqlen_q=5,
        max_seqlen_k=5,
        softmax_scale=0.125,
        causal=True,
        block_table=torch.tensor([[1, 0]], dtype=torch.int32),
    )
    args.update(changes)
    return args


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"q": torch.randn(5, 4, 64)}, "only support fp16 and bf16"),
        ({"k": torch.zeros(2, 256, 2, 64, dtype=torch.float16)}, "must have the same dtype"),
        ({"cu_seqlens_q": torch.tensor([0, 5])}, "cu_seqlens_q must have dtype int32"),
        (
            {"cu_seqlens_k": torch.tensor([0, 9, 5], dtype=torch.int32)[::2]},
            "cu_seqlens_k must be contiguous",
        ),
        ({"max_seqlen_q": torch.tensor(5)}, "expected a Python int"),
        ({"softmax_scale": torch.tensor(0.125)}, "softmax_scale must be a Python float"),
        ({"block_table": torch.tensor([[1, 0]])}, "block_table must have dtype torch.int32"),
    ],
)
def test_the_stand_in_refuses_what_flash_attn_refuses(changes: dict, message: str) -> None:
    fake_flash_attn.flash_attn_varlen_func(**_varlen_args())  # the valid call runs
    with pytest.raises(AssertionError, match=message):
        fake_flash_attn.flash_attn_varlen_func(**_varlen_args(**changes))


@pytest.mark.parametrize(("head_dim", "message"), [(12, "multiple of 8"), (264, "at most 256")])
def test_the_stand_in_refuses_head_dims_flash_attn_refuses(head_dim: int, message: str) -> None:
    q = torch.randn(2, 1, 4, head_dim, dtype=torch.bfloat16)
    cache = torch.zeros(2, 256, 2, head_dim, dtype=torch.bfloat16)
    table = torch.tensor([[0], [1]], dtype=torch.int32)
    with pytest.raises(AssertionError, match=message):
        fake_flash_attn.flash_attn_with_kvcache(
            q, cache, cache, cache_seqlens=torch.tensor([3, 4], dtype=torch.int32), block_table=table
        )


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


# -- decisions that depend on the GPU, checked on CPU with stand-ins for torch.cuda's queries -------
@pytest.fixture
def pretend_gpu(monkeypatch: pytest.MonkeyPatch):
    """torch.cuda answers as on a machine with one GPU of the returned capability (settable)."""
    capability = {"value": (9, 0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability["value"])
    return capability


@pytest.mark.parametrize("capability", [(10, 0), (12, 0)])
def test_flash_refuses_gpus_its_kernels_were_not_built_for(pretend_gpu, stand_in_flash, capability) -> None:
    pretend_gpu["value"] = capability
    major, minor = capability
    with pytest.raises(InvalidArgument, match=rf"built for sm_80 and sm_90 .* this GPU is sm_{major}{minor}"):
        select_backend("flash_attn", device="cuda", dtype=torch.bfloat16, block_size=256, head_dim=64)
    auto = BACKENDS.resolve("auto", BackendRequirements(torch.device("cuda"), torch.bfloat16, 256, 64))
    assert auto != "flash_attn"
    assert stand_in_flash.calls == []


@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (8, 9), (9, 0)])
def test_flash_runs_on_ampere_ada_and_hopper(pretend_gpu, stand_in_flash, capability) -> None:
    pretend_gpu["value"] = capability
    assert flash_attn_unavailable_reason(torch.device("cuda"), torch.bfloat16, 256, 64) is None


def test_flash_not_installed_says_how_to_install(pretend_gpu, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    reason = flash_attn_unavailable_reason(torch.device("cuda"), torch.bfloat16, 256, 64)
    assert reason == (
        "the flash-attn package is not installed (after torch: pip install flash-attn==2.8.3 --no-build-isolation)"
    )


@pytest.mark.parametrize(
    ("version", "ok"), [("2.6.1", False), ("2.6.0", False), ("2.6.2", True), ("2.8.3", True)]
)
def test_flash_versions_before_2_6_2_are_refused(
    pretend_gpu, stand_in_flash, monkeypatch, version, ok
) -> None:
    monkeypatch.setattr(stand_in_flash, "__version__", version, raising=False)
    reason = flash_attn_unavailable_reason(torch.device("cuda"), torch.float16, 256, 64)
    assert (reason is None) == ok, reason
    if not ok:
        assert f"flash-attn {version} is too old" in reason and "flash-attn==2.8.3" in reason


@pytest.mark.parametrize(
    ("backend", "device", "dtype", "head_dim", "expect"),
    [
        ("auto", "cuda", torch.bfloat16, 64, 256),
        ("", "cuda", torch.float16, 128, 256),
        ("flash_attn", "cuda", torch.bfloat16, 64, 256),
        ("torch", "cuda", torch.bfloat16, 64, 16),  # the torch backend gains nothing from big blocks
        ("triton", "cuda", torch.bfloat16, 64, 16),  # nor triton (any block size)
        ("auto", "cuda", torch.float32, 64, 16),  # flash-attn cannot run float32
        ("auto", "cuda", torch.bfloat16, 12, 16),  # nor this head_dim
        ("auto", "cpu", torch.bfloat16, 64, 16),
    ],
)
def test_default_block_size_is_256_where_flash_attn_runs(
    pretend_gpu, stand_in_flash, backend, device, dtype, head_dim, expect
) -> None:
    assert default_block_size(BACKENDS, backend, torch.device(device), dtype, head_dim) == expect


def test_default_block_size_without_flash_attn(pretend_gpu, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    cuda = torch.device("cuda")
    assert default_block_size(BACKENDS, "auto", cuda, torch.bfloat16, 64) == 16
    pretend_gpu["value"] = (10, 0)
    assert default_block_size(BACKENDS, "auto", cuda, torch.bfloat16, 64) == 16


LLAMA_CONFIG = dict(
    architectures=["LlamaForCausalLM"], vocab_size=32, hidden_size=256, intermediate_size=64,
    num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
)  # fmt: skip


def _plan(options: LoadOptions, device: str) -> LoadPlan:
    config = ModelConfig.from_hf(dict(LLAMA_CONFIG))
    return make_load_plan(
        Path("unread"), config.architecture, config, options, torch.device(device), BACKENDS, weight_bytes=0
    )


def test_the_load_plan_carries_the_default_block_size(pretend_gpu, stand_in_flash, monkeypatch) -> None:
    """Admission and the build both read the plan's cache: they size it with the same block size."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 << 30, 16 << 30))
    plan = _plan(LoadOptions(dtype=torch.bfloat16, kv_cache=KvCacheOptions(num_blocks=8)), "cuda")
    assert (plan.cache.block_size, plan.cache.num_blocks, plan.attention_backend) == (256, 8, "flash_attn")
    explicit = LoadOptions(dtype=torch.bfloat16, kv_cache=KvCacheOptions(block_size=512, num_blocks=8))
    assert _plan(explicit, "cuda").cache.block_size == 512
    cpu = _plan(LoadOptions(kv_cache=KvCacheOptions(num_blocks=8)), "cpu")
    assert (cpu.cache.block_size, cpu.attention_backend) == (16, "torch")


def test_named_flash_attn_says_why_not_rather_than_blaming_the_default_block_size(
    pretend_gpu, stand_in_flash, monkeypatch
) -> None:
    """A Load naming flash_attn and no block size gets 256 even where flash-attn cannot run, so the
    error names the real cause (here the GPU), not a block size of 16 the client never asked for."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 << 30, 16 << 30))
    pretend_gpu["value"] = (12, 0)
    options = LoadOptions(dtype=torch.bfloat16, attention_backend="flash_attn")
    with pytest.raises(
        InvalidArgument, match="flash_attn cannot run: flash-attn's kernels are built for sm_80"
    ):
        _plan(options, "cuda")
