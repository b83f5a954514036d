"""Out of memory, on a real `modelworker serve` process.

- Admission: a Load whose estimate (weights + KV cache) exceeds the worker's memory budget
  (`--memory-budget-bytes`) is refused with RESOURCE_EXHAUSTED before anything is allocated.
- A real allocation that fails: the test lowers the worker's address-space limit (RLIMIT_AS, set on
  the running process with prlimit) to a little above what it maps, then sends a forward whose logits
  need more than that. The kernel refuses the mapping, torch's CPU allocator raises, and the worker
  must answer RESOURCE_EXHAUSTED, not INTERNAL, and serve the next call. The same limit makes a Load's
  KV cache allocation fail after the admission check passed (free memory is plenty; the process may
  not map it). Nothing in the worker is stubbed: the failure comes from the allocator.
"""

from __future__ import annotations

import hashlib
import resource
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.tiny_models import make_tiny_model_dir
from worker.pb.modelworker.v1 import worker_pb2 as pb

from .common import SMALL_KV, Code, MiB, assert_status, rpc_error
from .procs import ServeProcess

BUDGET = 1024 * MiB
# A vocabulary of 65536 makes the logits the big allocation: 1024 tokens × 65536 × 4 bytes = 256 MiB
# of float32 logits inside the model (the reply, in bfloat16, is half of that).
WIDE = dict(
    vocab_size=65536,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)
WIDE_KV = pb.KvCacheConfig(block_size=16, num_blocks=16, max_seq_len=256, max_batch_size=1)
# Room left above the mapped address space: enough for the small allocations of a call, far less
# than the 256 MiB of logits.
HEADROOM = 160 * MiB


@pytest.fixture(scope="module")
def worker(
    tmp_path_factory: pytest.TempPathFactory,
    model_root: Path,
    plugin_env: dict[str, str],
    weights_seed: int,
) -> Iterator[ServeProcess]:
    root = tmp_path_factory.mktemp("oom-root")
    shutil.copytree(model_root / "medium", root / "medium")
    make_tiny_model_dir(root / "wide", "llama", seed=weights_seed + 10, **WIDE)
    with ServeProcess(root, plugin_env, "--memory-budget-bytes", str(BUDGET)) as running:
        yield running


def test_load_over_the_budget_allocates_nothing(worker: ServeProcess) -> None:
    stub = worker.stub
    for _ in range(2):  # warm-up: imports, thread pool, allocator
        stub.Load(pb.LoadRequest(model_id="m", model_dir="medium", kv_cache=SMALL_KV))
        stub.Unload(pb.UnloadRequest(model_id="m"))
    # 2 layers × 2 KV heads × 64 × 4 bytes × K and V = 2 KiB per token; 48000 blocks of 16 tokens
    # and one 128-token row ≈ 1.5 GiB of KV cache, over the 1 GiB budget. Allocated, it would show in
    # RSS at once (the caches are zeroed).
    kv = pb.KvCacheConfig(block_size=16, num_blocks=48000, max_seq_len=128, max_batch_size=1)
    kv_bytes = 2048 * (48000 * 16 + 128)
    rss_before, vms_before = worker.settled_rss(), worker.vms()
    err = rpc_error(lambda: stub.Load(pb.LoadRequest(model_id="big", model_dir="medium", kv_cache=kv)))
    rss_after, vms_after = worker.settled_rss(), worker.vms()
    assert_status(
        err,
        Code.RESOURCE_EXHAUSTED,
        "loading medium needs",
        f"KV cache {kv_bytes}",
        f"memory budget of {BUDGET}",
    )
    print(
        f"over-budget Load (estimate {kv_bytes / MiB:.0f} MiB of KV cache, budget {BUDGET / MiB:.0f} MiB): "
        f"RSS {rss_before / MiB:.1f} → {rss_after / MiB:.1f} MiB, "
        f"virtual {vms_before / MiB:.1f} → {vms_after / MiB:.1f} MiB"
    )
    assert rss_after - rss_before <= 2 * MiB and vms_after - vms_before <= 2 * MiB
    assert worker.model_ids() == []
    stub.Load(pb.LoadRequest(model_id="m", model_dir="medium", kv_cache=SMALL_KV))
    assert len(stub.Forward(pb.ForwardRequest(model_id="m", token_ids=[1, 2])).next_token_ids) == 1
    stub.Unload(pb.UnloadRequest(model_id="m"))


def _digest(reply: pb.ForwardResponse) -> str:
    return hashlib.sha256(reply.logits.data).hexdigest()


def test_allocation_failures_are_resource_exhausted(worker: ServeProcess) -> None:
    stub = worker.stub
    stub.Load(pb.LoadRequest(model_id="w", model_dir="wide", kv_cache=WIDE_KV))
    small = pb.ForwardRequest(model_id="w", token_ids=[3, 1, 4, 1, 5])
    big = pb.ForwardRequest(
        model_id="w",
        token_ids=[(i * 7919) % 65536 for i in range(1024)],
        batch_size=4,
        logits_mode=pb.LOGITS_ALL,
        logits_dtype=pb.BFLOAT16,
    )
    small_ref = _digest(stub.Forward(small))
    big_ref = _digest(stub.Forward(big, timeout=60))  # fits without the limit
    soft, hard = resource.prlimit(worker.proc.pid, resource.RLIMIT_AS)
    rss_before, vms_before = worker.settled_rss(), worker.vms()
    limit = vms_before + HEADROOM
    resource.prlimit(worker.proc.pid, resource.RLIMIT_AS, (limit, hard))
    try:
        err = rpc_error(lambda: stub.Forward(big, timeout=60))
        assert_status(err, Code.RESOURCE_EXHAUSTED, "out of memory", "'w'", "268435456 bytes")
        rss_after = worker.settled_rss()
        # The next call works, under the same limit, and answers as before.
        assert _digest(stub.Forward(small)) == small_ref
        # A Load whose KV cache the allocator refuses: 262144 blocks × 16 tokens × 128 bytes = 512 MiB,
        # within the budget and the free memory (admitted), beyond the address-space limit.
        vms_load = worker.vms()
        kv = pb.KvCacheConfig(block_size=16, num_blocks=262144, max_seq_len=256, max_batch_size=1)
        load_err = rpc_error(lambda: stub.Load(pb.LoadRequest(model_id="w2", model_dir="wide", kv_cache=kv)))
        assert_status(load_err, Code.RESOURCE_EXHAUSTED, "paged KV cache of 262144 blocks", "does not fit")
        assert worker.model_ids() == ["w"]
        vms_after_load = worker.vms()
        assert _digest(stub.Forward(small)) == small_ref
    finally:
        resource.prlimit(worker.proc.pid, resource.RLIMIT_AS, (soft, hard))
    print(
        f"forward needing 256 MiB of logits under an address-space limit {HEADROOM / MiB:.0f} MiB above "
        f"the {vms_before / MiB:.0f} MiB mapped: {err.code().name}; RSS {rss_before / MiB:.1f} → "
        f"{rss_after / MiB:.1f} MiB. Load of a 512 MiB KV cache under the same limit: "
        f"{load_err.code().name}; virtual {vms_load / MiB:.1f} → {vms_after_load / MiB:.1f} MiB"
    )
    # Nothing of the refused 256 MiB stays; the slack covers the activations the forward had made before
    # the refusal, which the allocator may keep in its arenas (seen up to ~14 MiB on a busy machine).
    assert rss_after - rss_before <= 32 * MiB
    # The half-built model (512 MiB of cache) was freed. The slack is one malloc arena: a thread that
    # runs its first Load here may reserve a fresh 64 MiB glibc arena (address space, not memory).
    assert vms_after_load - vms_load <= 64 * MiB + 8 * MiB
    # With the limit lifted, the same big call succeeds and answers as it did before.
    assert _digest(stub.Forward(big, timeout=60)) == big_ref
    stub.Unload(pb.UnloadRequest(model_id="w"))
    assert worker.model_ids() == []
