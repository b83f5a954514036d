"""CUDA graphs for decode steps (architectures/cuda_graphs.py).

On the CPU: the batch sizes and padding, and the replay path's buffer handling, with a stand-in for
the graph that re-runs the step over the static buffers (so padded rows, slot -1 and the block
table copy are checked against an eager call of the same model, triton backend interpreted). With CUDA (marker `gpu`): the
triton backend compiled against the torch backend, and graph replays equal eager decode steps
bit for bit at the captured sizes.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from architectures import llama
from architectures.backends import TorchBackend, TritonBackend
from architectures.cuda_graphs import DecodeGraphs, _Graph, graph_batch_sizes, padded_size
from architectures.paged import PagedKvCache, prepare_paged_batch
from registry import KvCacheOptions, LoadOptions
from tests.tiny_models import make_tiny_model_dir
from tests.triton_interpreter import needs_interpreter

from .reference import PagedSim, Scheduler

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")


@pytest.mark.parametrize(
    ("limit", "sizes"),
    [(64, [1, 2, 4, 8, 16, 32, 64]), (48, [1, 2, 4, 8, 16, 32, 48]), (1, [1]), (3, [1, 2, 3]), (0, [])],
)
def test_graph_batch_sizes(limit: int, sizes: list[int]) -> None:
    assert graph_batch_sizes(limit) == sizes


def test_padded_size() -> None:
    sizes = graph_batch_sizes(48)
    assert [padded_size(b, sizes) for b in (1, 2, 3, 5, 16, 17, 33, 48)] == [1, 2, 4, 8, 16, 32, 48, 48]
    assert padded_size(49, sizes) is None


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(
        tmp_path_factory.mktemp("graphs-llama"), "llama", seed=4, max_position_embeddings=256
    )


class _EagerGraph:
    """Stands in for torch.cuda.CUDAGraph on the CPU: a replay re-runs the step over the static buffers."""

    def __init__(self, step, batch, out: torch.Tensor) -> None:
        self.step, self.batch, self.out = step, batch, out

    def replay(self) -> None:
        self.out.copy_(self.step(self.batch))


@needs_interpreter
def test_replay_pads_to_the_next_size_and_matches_eager_on_cpu(llama_dir: Path) -> None:
    """The triton backend (the one graphs capture), interpreted; two decode splits, as a capture fixes."""
    options = LoadOptions(attention_backend="triton", kv_cache=KvCacheOptions(block_size=16, num_blocks=16))
    model = llama.build(llama_dir, torch.device("cpu"), options)
    assert model.graphs is None  # no CUDA: no capture
    model.backend.fixed_splits = 2
    max_blocks = 8
    graphs = DecodeGraphs(model.paged, graph_batch_sizes(8), max_blocks)
    for size in graphs.sizes:
        batch = graphs._static_batch(size)
        out = torch.zeros(size, model.config.vocab_size)
        graphs.graphs[size] = _Graph(_EagerGraph(model._decode_step, batch, out), batch, out)
    sched = Scheduler(model, seed=2)
    prefill, _ = sched.build([(0, 20), (1, 3), (2, 40)], True)
    model.forward_paged(**prefill)
    for step in range(2):
        call, _ = sched.build([(2, 1), (0, 1), (1, 1)], False)
        batch = prepare_paged_batch(
            model.paged, **call, vocab_size=model.config.vocab_size, max_position_embeddings=256
        )
        assert graphs.can_replay(batch) and padded_size(3, graphs.sizes) == 4
        before_k = model.paged._k.clone()
        replayed = graphs.replay(batch)
        # Only the three new tokens' slots changed: the padding row (slot -1) stored nothing.
        changed = (model.paged._k != before_k).any(dim=(0, 3, 4)).flatten().nonzero().flatten().tolist()
        assert changed == sorted(call["slot_mapping"].tolist()), step
        eager = model.forward_paged(**call)  # stores the same K/V again, then attends eagerly
        assert replayed.shape == eager.shape == (3, model.config.vocab_size)
        assert float((replayed - eager).abs().max()) <= 1e-5
    too_wide = prepare_paged_batch(
        model.paged, [1], [150], [list(range(10))], [-1], [151], False, vocab_size=model.config.vocab_size,
        max_position_embeddings=256,
    )  # fmt: skip
    assert not graphs.can_replay(too_wide)  # 10 blocks > the 8 the buffers hold: runs eagerly


# -- CUDA ----------------------------------------------------------------------------------------
ATTN_TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4}


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("block_size", [16, 256])
def test_triton_on_cuda_matches_torch_backend(dtype: torch.dtype, block_size: int) -> None:
    blocks = 24 if block_size >= 256 else 64
    cache = PagedKvCache(2, blocks, block_size, 2, 64, dtype, torch.device("cuda"))
    sim = PagedSim(
        cache, TritonBackend(), 8, windows=[None, 50], seed=block_size, compare_backend=TorchBackend()
    )
    lengths = [300, 20, 513] if block_size >= 256 else [37, 20, 65]
    err = [sim.step([(0, lengths[0]), (1, lengths[1]), (2, lengths[2])])]
    err.append(sim.step([(0, 1), (1, 1), (2, 1)], is_prefill=False))
    sim.release(1)
    sim.fork(2, 3, blocks=lengths[2] // block_size)
    err.append(sim.step([(0, 9), (3, 6)]))
    err.append(sim.step([(2, 1), (4, 40), (3, 1)]))
    assert max(err) <= ATTN_TOL[dtype], err
    assert sim.backend_diff <= ATTN_TOL[dtype], sim.backend_diff


@needs_cuda
@pytest.mark.gpu
def test_graph_replay_equals_eager_bit_for_bit(llama_dir: Path) -> None:
    options = LoadOptions(
        dtype=torch.bfloat16,
        attention_backend="triton",
        kv_cache=KvCacheOptions(block_size=16, num_blocks=256),
    )
    model = llama.build(llama_dir, torch.device("cuda"), options)
    assert model.cuda_graph_batch_sizes == [1, 2, 4, 8, 16, 32, 64] and model.cuda_graph_bytes > 0
    eager_only = llama.build(llama_dir, torch.device("cuda"), replace(options, enforce_eager=True))
    assert eager_only.cuda_graph_batch_sizes == [] and eager_only.graphs is None
    sched = Scheduler(model, seed=5)
    prefill, _ = sched.build([(s, 5 + 3 * s) for s in range(16)], True)
    model.forward_paged(**prefill)
    graphs = model.graphs
    for n in (1, 2, 16, 3):
        call, _ = sched.build([(s, 1) for s in range(n)], False)
        replayed = model.forward_paged(**call)  # replayed from the graph of size padded_size(n)
        model.graphs = None
        try:
            eager = model.forward_paged(**call)  # same kernels, same split count, run eagerly
        finally:
            model.graphs = graphs
        if n in graphs.sizes:
            assert torch.equal(replayed, eager), n
        else:  # padded to 4 rows: the linear layers see another batch size
            assert float((replayed - eager).abs().max() / eager.abs().max()) <= 1e-2, n
