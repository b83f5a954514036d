"""The triton backend's kernels, run on the CPU under the Triton interpreter (TRITON_INTERPRET=1):
against the float64 reference and the torch backend on random paged batches (prefill, cached
prefix, decode with split-K, mixed; GQA, windows, block sizes 16/32/256; fp32 and bf16), softcapping,
the K/V store, and whole models (Llama, Qwen2) against transformers.

The interpreter is slow: shapes are tiny and the cases few. tests/conftest.py sets TRITON_INTERPRET=1
on machines without CUDA before anything imports triton; on CUDA machines the kernel tests skip here
(tests/architectures_paged/test_gpu.py runs them compiled).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import architectures.backends.triton_backend as triton_backend
from architectures import llama, qwen2
from architectures.backends import TorchBackend, TritonBackend, available_backends, select_backend
from architectures.paged import PagedContext, PagedKvCache, prepare_paged_batch
from registry import InvalidArgument, KvCacheOptions, LoadOptions
from tests.tiny_models import make_hf_model, save_hf_model
from tests.triton_interpreter import needs_interpreter

from .reference import PagedSim, Scheduler

CPU = torch.device("cpu")
# Attention outputs are averages of unit-variance values (|out| is O(1)), so these absolute bounds
# are relative ones: fp32 1e-4, bf16 2e-2 (the rounding of bf16 inputs and outputs).
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    # Split decode every 16 keys, so the short contexts here run the split-K kernel and its reduction.
    monkeypatch.setattr(triton_backend, "DECODE_SPLIT_KEYS", 16)


CASES = [
    # dtype, block size, query heads, KV heads, head_dim, windows per layer
    (torch.float32, 16, 6, 2, 16, [None, 7]),
    (torch.bfloat16, 32, 4, 4, 16, [None, 20]),
    (torch.float32, 256, 4, 1, 16, [None, 30]),
    (torch.float32, 16, 2, 1, 160, [None, 7]),  # head_dim not a power of two, past 128 (smaller tiles)
]


@pytest.mark.parametrize(
    ("dtype", "block_size", "num_heads", "num_kv_heads", "head_dim", "windows"),
    CASES,
    ids=[f"{str(c[0])[6:]}-bs{c[1]}-h{c[2]}kv{c[3]}-d{c[4]}" for c in CASES],
)
@needs_interpreter
def test_triton_matches_reference_and_torch_backend(
    dtype, block_size, num_heads, num_kv_heads, head_dim, windows
):
    num_blocks = 24 if block_size < 256 else 6
    cache = PagedKvCache(2, num_blocks, block_size, num_kv_heads, head_dim, dtype, CPU)
    sim = PagedSim(
        cache, TritonBackend(), num_heads, windows=windows, seed=block_size, compare_backend=TorchBackend()
    )
    prompts = [37, 20, 5] if block_size < 256 else [300, 20, 5]
    err = {"prefill": sim.step([(0, prompts[0]), (1, prompts[1]), (2, prompts[2])])}
    err["decode (split-K)"] = sim.step([(0, 1), (1, 1), (2, 1)], is_prefill=False)
    sim.release(1)
    sim.fork(0, 3, blocks=prompts[0] // block_size)
    err["prefix-cached prefill"] = sim.step([(3, 6), (2, 9)])
    err["mixed"] = sim.step([(2, 1), (4, 12), (0, 1), (3, 1)])
    err["decode"] = sim.step([(3, 1), (4, 1)], is_prefill=False)
    tol = TOL[dtype]
    assert max(err.values()) <= tol, err
    assert sim.backend_diff <= tol, f"triton vs torch backend: {sim.backend_diff}"


def _softcap_reference(q, k, v, window, scale, cap):
    """q [L, H, D] (the last L of len(k) positions), k/v [C, Hkv, D]; float64, scores capped."""
    length, heads, _ = q.shape
    ctx, kv_heads, _ = k.shape
    kv_of = torch.arange(heads) // (heads // kv_heads)
    scores = torch.einsum("lhd,chd->hlc", q.double(), k.double()[:, kv_of]) * scale
    scores = cap * torch.tanh(scores / cap)
    q_pos = torch.arange(ctx - length, ctx)[:, None]
    k_pos = torch.arange(ctx)[None, :]
    allowed = (k_pos <= q_pos) & ((k_pos > q_pos - window) if window else True)
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.einsum("hlc,chd->lhd", probs, v.double()[:, kv_of])


@needs_interpreter
@pytest.mark.parametrize("window", [None, 9])
def test_softcap_in_prefill_and_split_decode(window: int | None) -> None:
    """Gemma 2's capping (softcap * tanh(scores / softcap)), through the varlen and decode kernels;
    the scores are scaled up so that the cap really bends them."""
    gen = torch.Generator().manual_seed(7)
    cache = PagedKvCache(1, 8, 16, 2, 16, torch.float32, CPU)
    backend, cap, scale = TritonBackend(), 5.0, 1.0
    ctx = 40
    table = [5, 2, 7]
    k = torch.randn(ctx, 2, 16, generator=gen) * 2
    v = torch.randn(ctx, 2, 16, generator=gen)
    q = torch.randn(ctx, 4, 16, generator=gen) * 2
    slots = [table[i // 16] * 16 + i % 16 for i in range(ctx)]
    for length, is_prefill in ((ctx - 1, True), (1, False)):
        rows = slice(0, ctx - 1) if is_prefill else slice(ctx - 1, ctx)
        end = length if is_prefill else ctx
        batch = prepare_paged_batch(
            cache, [0] * length, list(range(end - length, end)), [table], slots[end - length : end],
            [end], is_prefill, [length], vocab_size=1, max_position_embeddings=64,
        )  # fmt: skip
        ctx_obj = PagedContext(cache, batch, backend)
        ctx_obj.store(0, k[rows], v[rows])
        got = backend.attend(cache, 0, q[rows], batch, ctx_obj.plan, window, scale, softcap=cap)
        want = _softcap_reference(q[rows], k[:end], v[:end], window, scale, cap)
        assert (got.double() - want).abs().max() <= 1e-4, f"prefill={is_prefill}"
        plain = backend.attend(cache, 0, q[rows], batch, ctx_obj.plan, window, scale)
        assert (plain - got).abs().max() > 1e-2  # the cap changed the result


@needs_interpreter
def test_store_skips_slot_minus_one_and_matches_the_torch_store() -> None:
    gen = torch.Generator().manual_seed(3)
    caches = [PagedKvCache(1, 4, 16, 2, 16, torch.bfloat16, CPU) for _ in range(2)]
    for c in caches:
        c.k[0].copy_(torch.randn(c.k[0].shape, generator=gen))  # same stale contents in both
    caches[1].k[0].copy_(caches[0].k[0])
    slots = [33, -1, 35, -1, 37]
    batch = prepare_paged_batch(
        caches[0], [0] * 5, list(range(33, 38)), [[1, 0, 2]], slots, [38], True, [5],
        vocab_size=1, max_position_embeddings=64,
    )  # fmt: skip
    k = torch.randn(5, 2, 16, generator=gen)
    v = torch.randn(5, 2, 16, generator=gen)
    PagedContext(caches[0], batch, TritonBackend()).store(0, k, v)
    PagedContext(caches[1], batch, TorchBackend()).store(0, k, v)
    assert torch.equal(caches[0].k[0], caches[1].k[0]) and torch.equal(caches[0].v[0], caches[1].v[0])
    flat = caches[0].flat_k(0)
    assert torch.equal(flat[33], k[0].bfloat16()) and torch.equal(flat[37], k[4].bfloat16())
    assert torch.equal(flat[34], caches[1].flat_k(0)[34])  # the skipped token's slot kept its contents


# -- selection -----------------------------------------------------------------------------------


def test_selection_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = select_backend("triton", device=CPU, dtype=torch.float32, block_size=16)
    assert isinstance(backend, TritonBackend) and backend.name == "triton"
    assert select_backend("auto", device=CPU, dtype=torch.float32, block_size=16).name == "torch"
    assert available_backends("cpu") == ["torch"]  # the interpreter is for tests: not advertised
    with pytest.raises(InvalidArgument, match="triton cannot run: it needs float16, bfloat16 or float32"):
        select_backend("triton", device=CPU, dtype=torch.float64, block_size=16)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(
        InvalidArgument, match="on the CPU it runs only under the Triton interpreter: set TRITON_INTERPRET=1"
    ):
        select_backend("triton", device=CPU, dtype=torch.float32, block_size=16)


def test_interpreter_asked_for_after_triton_was_imported_compiled() -> None:
    code = (
        "import os, torch, triton.language\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "from architectures.backends import select_backend\n"
        "select_backend('triton', device='cpu', dtype=torch.float32, block_size=16)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode != 0
    assert "triton was imported before TRITON_INTERPRET=1 was set" in out.stderr


def test_importing_architectures_does_not_import_triton() -> None:
    code = "import sys, architectures, architectures.backends; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- whole models against transformers -------------------------------------------------------


@needs_interpreter
@pytest.mark.parametrize(
    ("arch", "overrides"),
    [
        ("llama", dict(max_position_embeddings=256)),  # GQA: 4 heads over 2 KV heads
        ("qwen2", dict(use_sliding_window=True, sliding_window=6, max_window_layers=1)),
    ],
    ids=["llama", "qwen2-window"],
)
def test_model_with_triton_matches_transformers(tmp_path, arch: str, overrides: dict) -> None:
    ref = make_hf_model(arch, seed=5, **overrides)
    model_dir = save_hf_model(ref, tmp_path / arch)
    build = {"llama": llama.build, "qwen2": qwen2.build}[arch]
    options = LoadOptions(attention_backend="triton", kv_cache=KvCacheOptions(block_size=16, num_blocks=12))
    model = build(model_dir, CPU, options)
    assert model.attention_backend == "triton" and model.cuda_graph_batch_sizes == []
    sched = Scheduler(model, seed=9)
    steps = [
        ([(0, 21), (1, 9)], True),
        ([(0, 1), (1, 1)], False),
        ([(1, 4), (2, 7), (0, 1)], True),  # chunked prefill, new prompt, decode: one mixed call
        ([(0, 1), (1, 1), (2, 1)], False),
    ]
    worst = 0.0
    for requests, is_prefill in steps:
        call, spans = sched.build(requests, is_prefill)
        logits = model.forward_paged(**call, all_logits=True)
        row = 0
        for sid, start, end in spans:
            with torch.no_grad():
                want = ref(torch.tensor([sched.seqs[sid].tokens[:end]])).logits[0, start:end]
            worst = max(worst, float((logits[row : row + end - start] - want).abs().max()))
            row += end - start
    assert worst <= 1e-4, f"{arch}: max |logit difference| against transformers {worst}"


# -- make gpu-check's hot-path rows, run on the CPU -------------------------------------------


@needs_interpreter
def test_gpu_check_triton_vs_torch_row_runs_on_cpu() -> None:
    from bench import gpu_hot_path

    diff = gpu_hot_path.triton_vs_torch(
        CPU, torch.float32, 16, num_heads=4, num_kv_heads=2, head_dim=8, lengths=(20, 5, 33)
    )
    assert 0 < diff <= 1e-5


@needs_interpreter
def test_gpu_check_graph_row_needs_cuda() -> None:
    from bench import gpu_check, gpu_hot_path

    shape = {**gpu_check.LLAMA_1B, "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64}
    shape.update(
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64
    )
    network = gpu_check.build_network(shape, CPU, torch.float32)
    with pytest.raises(RuntimeError, match="no CUDA graphs were captured"):
        gpu_hot_path.graphs_vs_eager(network, shape, CPU, torch.float32, (1,), context=8)
