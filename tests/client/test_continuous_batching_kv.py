"""examples/continuous_batching.py with KV block transfer: preemption by swapping blocks to host memory
and back, and prompts prefilled on a second worker whose blocks are moved to the decoding one. Every
prompt's tokens equal plain greedy Forward for that prompt alone."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from examples import continuous_batching as cb
from tests.client.test_continuous_batching import assert_matches_reference
from tests.worker.harness import RunningServer, make_settings, start_server
from worker.client import FailedPreconditionError, KvCacheConfig, ModelWorkerClient

BLOCK = 4


@pytest.fixture(scope="module")
def kv_worker(worker: RunningServer) -> RunningServer:
    with ModelWorkerClient(worker.target, timeout=60) as c:
        c.load("kv", "qwen", kv_cache=KvCacheConfig(block_size=BLOCK, num_blocks=12))
    return worker


@pytest.fixture(scope="module")
def prefill_worker(aio_loop: asyncio.AbstractEventLoop, client_model_root: Path) -> Iterator[RunningServer]:
    running = start_server(aio_loop, make_settings(client_model_root, grace_seconds=0.5))
    with ModelWorkerClient(running.target, timeout=60) as c:
        c.load("kv", "qwen", kv_cache=KvCacheConfig(block_size=BLOCK, num_blocks=8))
        c.load("kv-bs8", "qwen", kv_cache=KvCacheConfig(block_size=8, num_blocks=8))
        c.load("kv-bf16", "qwen", dtype="bfloat16", kv_cache=KvCacheConfig(block_size=BLOCK, num_blocks=8))
    yield running
    running.stop(grace=0.5)


def workload(rng: random.Random) -> tuple[list[list[int]], list[int]]:
    """Four prompts growing by 10 (at their peak 4 x 5 of 12 blocks) and two short ones."""
    prompts = [[rng.randrange(128) for _ in range(n)] for n in (14, rng.randint(8, 10), 9, 8)]
    prompts += [[rng.randrange(128) for _ in range(rng.randint(1, 10))] for _ in range(2)]
    return prompts, [10, 10, 10, 10, rng.randint(1, 8), rng.randint(1, 8)]


def test_preemption_by_swapping_keeps_the_tokens_and_recomputes_nothing(
    kv_worker: RunningServer, client
) -> None:
    seed = random.randrange(2**31)
    print(f"seed {seed}")
    prompts, new = workload(random.Random(seed))
    swap = cb.run(client, "kv", prompts, new, max_num_seqs=4, max_batch_tokens=8, preempt="swap")
    assert_matches_reference(client, "kv", prompts, new, swap)
    s = swap.stats
    assert s.preemptions > 0 and s.swaps_out == s.swaps_in > 0, (seed, s)
    assert s.swapped_bytes > 0 and s.swapped_bytes % (2 * 2 * BLOCK * 2 * 16 * 4) == 0  # whole fp32 blocks
    # Nothing was computed twice: every prompt token at most once (prefix hits are free).
    assert s.prompt_tokens_computed <= s.prompt_tokens
    recompute = cb.run(client, "kv", prompts, new, max_num_seqs=4, max_batch_tokens=8)
    assert recompute.outputs == swap.outputs
    assert (
        recompute.stats.preemptions > 0 and recompute.stats.prompt_tokens_computed > s.prompt_tokens_computed
    )


def test_prefill_on_another_worker_then_decode_here(
    kv_worker: RunningServer, prefill_worker: RunningServer, client
) -> None:
    seed = random.randrange(2**31)
    print(f"seed {seed}")
    prompts, new = workload(random.Random(seed))
    with ModelWorkerClient(prefill_worker.target, timeout=60) as prefill:
        result = cb.run(
            client, "kv", prompts, new, max_num_seqs=4, max_batch_tokens=8, prefill_client=prefill
        )
        assert_matches_reference(client, "kv", prompts, new, result)
        s = result.stats
        # Every prompt (and every recomputation after a preemption) was prefilled over there.
        assert s.remote_prefills == len(prompts) + s.preemptions and s.transferred_bytes > 0, (seed, s)
        assert s.prompt_tokens_computed == 0 and s.prefill_steps == 0
        with pytest.raises(ValueError, match="blocks of 8 tokens, the decode worker's 'kv' of 4"):
            cb.run(client, "kv", prompts[:1], 2, prefill_client=prefill, prefill_model_id="kv-bs8")
        # Another dtype: the decode worker refuses the blocks.
        with pytest.raises(FailedPreconditionError, match="dtype BFLOAT16 vs FLOAT32"):
            cb.run(client, "kv", prompts[:1], 2, prefill_client=prefill, prefill_model_id="kv-bf16")
