"""The torch backend's bounded working memory (issue 21 item 1) and fused SDPA (issue 23 item 3).

With the chunk bounds shrunk to a few hundred bytes every path that long contexts take in
production runs on tiny shapes: decode sequences split into groups, keys attended chunk by chunk
with the online softmax, prefill queries split into chunks; each against the float64 reference on
fresh random data, with and without a window, GQA and not. The profiler shows which SDPA kernel
runs: the fused CPU flash kernel, never the math path."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from architectures.backends import TorchBackend
from architectures.backends import torch_backend as tb
from architectures.paged import PagedContext, PagedKvCache, prepare_paged_batch

from .reference import PagedSim

TOL = 1e-5  # float32 against float64


@pytest.mark.parametrize(("key_bytes", "score_bytes"), [(2048, 1024), (64, 64)])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(6, 2), (2, 2)])
def test_chunked_attention_matches_reference(
    monkeypatch: pytest.MonkeyPatch, key_bytes: int, score_bytes: int, num_heads: int, num_kv_heads: int
) -> None:
    # One key's K+V is 2 * Hkv * 8 * 4 bytes: 2048 bytes hold 16 (Hkv 2) or 32 keys (Hkv 1 ...), 64
    # bytes less than one key, so every chunk is the minimum (one block) and every group one sequence.
    monkeypatch.setattr(tb, "KEY_CHUNK_BYTES", key_bytes)
    monkeypatch.setattr(tb, "SCORE_CHUNK_BYTES", score_bytes)
    block_size = 4
    lengths = [9, 23, 40]
    cache = PagedKvCache(2, 64, block_size, num_kv_heads, 8, torch.float32, "cpu")
    sim = PagedSim(cache, TorchBackend(), num_heads, windows=[None, 6], seed=7 * num_heads + key_bytes)
    errors = {"prefill": sim.step([(0, lengths[0]), (1, lengths[1]), (2, lengths[2])])}
    for i in range(3):
        errors[f"decode {i}"] = sim.step([(0, 1), (1, 1), (2, 1)], is_prefill=False)
    sim.release(0)
    sim.fork(2, 3, blocks=lengths[2] // block_size)
    errors["prefix-cached prefill"] = sim.step([(1, 7), (3, 6)])
    errors["mixed"] = sim.step([(2, 1), (4, 13), (1, 1), (3, 1)], is_prefill=True)
    errors["decode after mixed"] = sim.step([(4, 1), (3, 1), (2, 1), (1, 1)], is_prefill=False)
    bad = {k: e for k, e in errors.items() if not e <= TOL}
    assert not bad, f"chunked paged attention differs from the reference: {bad}"


def test_decode_groups_keep_each_group_within_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tb, "KEY_CHUNK_BYTES", 4096)
    cache = PagedKvCache(1, 64, 4, 2, 8, torch.float32, "cpu")  # 128 bytes per key: 32 keys a chunk
    key = 2 * 2 * 8 * 4
    ctxs = [3, 5, 8, 30, 2, 100, 1, 1]
    plan = tb.TorchPlan(None, None, None, ctxs, [], all_decode=True)
    groups = tb._decode_groups(plan, cache, None)
    assert [r.start for r, _, _ in groups][0] == 0 and groups[-1][0].stop == len(ctxs)
    assert all(a[0].stop == b[0].start for a, b in zip(groups, groups[1:], strict=False))
    for rows, width, chunk in groups:
        n = rows.stop - rows.start
        assert width == max(-(-c // 4) * 4 for c in ctxs[rows])
        assert n * min(width, chunk) * key <= 4096 or (n == 1 and chunk == 4)
        assert chunk % 4 == 0
    # the 100-token sequence is alone and attended in chunks
    assert any(rows == slice(5, 6) and width > chunk for rows, width, chunk in groups)


def _attention_kernels(is_prefill: bool, dtype: torch.dtype) -> set[str]:
    cache = PagedKvCache(1, 32, 16, 2, 32, dtype, "cpu")
    ctx_len, q_len = 100, (60 if is_prefill else 1)
    table = list(range(7))
    start = ctx_len - q_len
    batch = prepare_paged_batch(
        cache,
        list(range(q_len)),
        list(range(start, ctx_len)),
        [table],
        [i for i in range(start, ctx_len)],
        [ctx_len],
        is_prefill,
        [q_len],
        vocab_size=1000,
        max_position_embeddings=1000,
    )
    context = PagedContext(cache, batch, TorchBackend())
    g = torch.Generator().manual_seed(3)
    q = torch.randn(q_len, 4, 32, generator=g).to(dtype)
    k = torch.randn(q_len, 2, 32, generator=g).to(dtype)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        context.attend(0, q, k, k.clone(), None, 32**-0.5)
    return {e.key for e in prof.key_averages() if "attention" in e.key}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("is_prefill", [True, False])
def test_sdpa_runs_the_fused_cpu_kernel(is_prefill: bool, dtype: torch.dtype) -> None:
    kernels = _attention_kernels(is_prefill, dtype)
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in kernels, kernels
    assert "aten::_scaled_dot_product_attention_math" not in kernels, kernels
