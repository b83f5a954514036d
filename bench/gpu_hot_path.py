"""The GPU hot path's rows of `make gpu-check` (bench/gpu_check.py calls `report`):

1. triton vs torch backend: max |difference| of the attention outputs on the same cache and
   batches (prefill, decode, prefix-cached prefill, mixed; a sliding window), per dtype and block size;
2. decode step eager vs CUDA graphs at batch 1/16/64 of the 1B-class random Llama on the triton
   backend: mean step time of each, and the max |logit difference| between them.
"""

from __future__ import annotations

import math
import time
import traceback

import torch

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK_SIZES = (16, 32, 256)


def triton_vs_torch(
    device: torch.device,
    dtype: torch.dtype,
    block_size: int,
    *,
    num_heads: int = 32,
    num_kv_heads: int = 8,
    head_dim: int = 64,
    lengths: tuple[int, int, int] = (300, 20, 513),
) -> float:
    """Max |triton - torch| over a scheduler-like run where both read the same cache."""
    from architectures.backends import TorchBackend, select_backend
    from architectures.paged import PagedKvCache
    from tests.architectures_paged.reference import PagedSim

    triton = select_backend("triton", device=device, dtype=dtype, block_size=block_size, head_dim=head_dim)
    blocks = 3 * sum(math.ceil(n / block_size) + 2 for n in lengths)
    cache = PagedKvCache(2, blocks, block_size, num_kv_heads, head_dim, dtype, device)
    sim = PagedSim(cache, triton, num_heads, windows=[None, 100], seed=1, compare_backend=TorchBackend())
    sim.step([(0, lengths[0]), (1, lengths[1]), (2, lengths[2])])
    sim.step([(0, 1), (1, 1), (2, 1)], is_prefill=False)
    sim.release(1)
    sim.fork(2, 3, blocks=lengths[2] // block_size)
    sim.step([(0, 7), (3, 9)])
    sim.step([(2, 1), (4, 33), (3, 1)])
    return sim.backend_diff


def graphs_vs_eager(
    network: torch.nn.Module,
    shape: dict,
    device: torch.device,
    dtype: torch.dtype,
    batch_sizes: tuple[int, ...],
    *,
    context: int = 512,
    block_size: int = 16,
    iters: int = 20,
) -> list[tuple[int, float, float, float]]:
    """(batch, eager ms, graph ms, max |logit difference|) per batch size, one triton model whose
    graphs are switched off for the eager runs (same kernels, same split count)."""
    from .gpu_check import wrap_model

    per_seq = math.ceil((context + 1) / block_size)
    model = wrap_model(network, shape, device, dtype, "triton", per_seq * max(batch_sizes), block_size)
    graphs = model.graphs
    if graphs is None:
        raise RuntimeError("no CUDA graphs were captured (they need CUDA and the triton backend)")
    rows = []
    for b in batch_sizes:
        tables = [[s * per_seq + j for j in range(per_seq)] for s in range(b)]
        gen = torch.Generator().manual_seed(b)
        call = dict(
            input_tokens=torch.randint(0, model.config.vocab_size, (b,), generator=gen),
            positions=torch.full((b,), context),
            block_tables=tables,
            slot_mapping=torch.tensor(
                [t[context // block_size] * block_size + context % block_size for t in tables]
            ),
            context_lens=[context + 1] * b,
            is_prefill=False,
        )
        timed = {}
        outs = {}
        for mode in ("eager", "graphs"):
            model.graphs = graphs if mode == "graphs" else None
            outs[mode] = model.forward_paged(**call)
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            for _ in range(iters):
                model.forward_paged(**call)
            torch.cuda.synchronize(device)
            timed[mode] = (time.perf_counter() - start) / iters * 1000
        model.graphs = graphs
        diff = float((outs["graphs"] - outs["eager"]).abs().max())
        rows.append((b, timed["eager"], timed["graphs"], diff))
    model.release()
    return rows


def report(device: torch.device, network_for, shape: dict, batch_sizes: tuple[int, ...]) -> tuple[str, bool]:
    """Markdown for both measurements and whether any failed. `network_for(dtype)` builds the
    random-weight network (bench/gpu_check.build_network)."""
    failed = False
    lines = ["| triton vs torch | dtype | block size | max abs diff |", "|---|---|---|---|"]
    for dtype in DTYPES:
        for bs in BLOCK_SIZES:
            name = str(dtype).removeprefix("torch.")
            try:
                lines.append(f"|  | {name} | {bs} | {triton_vs_torch(device, dtype, bs):.2e} |")
            except Exception as exc:
                traceback.print_exc()
                failed = True
                lines.append(f"|  | {name} | {bs} | failed: {type(exc).__name__}: {str(exc)[:120]} |")
    lines += [
        "",
        "| decode step, triton, bf16 | batch | eager ms | graphs ms | max logit diff |",
        "|---|---|---|---|---|",
    ]
    try:
        network = network_for(torch.bfloat16)
        for b, eager, graphs, diff in graphs_vs_eager(network, shape, device, torch.bfloat16, batch_sizes):
            lines.append(f"|  | {b} | {eager:.2f} | {graphs:.2f} | {diff:.2e} |")
        del network
    except Exception as exc:
        traceback.print_exc()
        failed = True
        lines.append(f"|  | — | failed: {type(exc).__name__}: {str(exc)[:160]} | | |")
    return "\n".join(lines), failed
