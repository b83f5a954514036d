"""No leaks across Load/Unload cycles of a real `modelworker serve` process.

30 cycles of Load → Forward (dense and paged) → Unload of the ~21 MB model. Measured from outside
(psutil, /proc/<pid>/fd) after each cycle:

- resident memory returns to within 10% of its level after the first cycle (the first cycle is the
  reference: it pays for lazy imports, the thread pool and the allocator's arenas). glibc keeps up to
  a couple of freed models' worth of heap mapped from one cycle to the next (the series swings by
  ~50 MB either way), so the rule is read on the lowest of the last five cycles: a leak of even
  1.5 MB per cycle would lift all of them above the bound;
- open file descriptors after the last cycle equal those after the first (the weights' file and its
  memory map are closed by every Load);
- threads: the worker's model executor starts its threads lazily, up to EXECUTOR_THREADS, and keeps
  them; nothing else may start a thread per cycle. Rule: the count never exceeds its level after the
  first cycle plus the executor threads not yet started (the pool may start one of those at any cycle,
  whenever a call arrives while its idle thread has not yet parked, so no per-cycle rule holds).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.pb.modelworker.v1 import worker_pb2 as pb
from worker.servicer import EXECUTOR_THREADS

from .common import SMALL_KV, MiB
from .procs import ServeProcess

CYCLES = 30
RSS_TOLERANCE = 0.10


@pytest.fixture
def worker(tmp_path: Path, model_root: Path, plugin_env: dict[str, str]) -> Iterator[ServeProcess]:
    shutil.copytree(model_root / "medium", tmp_path / "medium")
    with ServeProcess(tmp_path, plugin_env) as running:
        yield running


def test_load_unload_cycles_leak_nothing(worker: ServeProcess) -> None:
    stub = worker.stub
    dense = pb.ForwardRequest(
        model_id="m", token_ids=list(range(1, 33)), batch_size=2, logits_mode=pb.LOGITS_ALL
    )
    paged = pb.ForwardPagedRequest(
        model_id="m",
        input_tokens=list(range(40, 60)),
        positions=list(range(20)),
        block_tables=[pb.BlockTable(block_ids=[5, 9])],
        slot_mapping=[5 * 16 + i for i in range(16)] + [9 * 16 + i for i in range(4)],
        context_lens=[20],
        is_prefill=True,
    )
    samples: list[tuple[int, int, int]] = []  # (rss, fds, threads) after each cycle
    first_reply: tuple[bytes, bytes] | None = None
    for _ in range(CYCLES):
        loaded = stub.Load(pb.LoadRequest(model_id="m", model_dir="medium", kv_cache=SMALL_KV))
        assert not loaded.already_loaded
        reply = (stub.Forward(dense).logits.data, stub.ForwardPaged(paged).logits.data)
        first_reply = first_reply or reply
        assert reply == first_reply  # every fresh load answers the same
        stub.Unload(pb.UnloadRequest(model_id="m"))
        assert worker.model_ids() == []
        samples.append((worker.settled_rss(), worker.fds(), worker.threads()))
    rss = [s[0] for s in samples]
    fds = [s[1] for s in samples]
    threads = [s[2] for s in samples]
    print(
        f"{CYCLES} Load/Forward/Unload cycles of a {loaded.model.weight_bytes / MiB:.1f} MiB model "
        f"(+{loaded.model.kv_cache_bytes / MiB:.1f} MiB KV cache): RSS after cycle 1 {rss[0] / MiB:.1f} MiB, "
        f"lowest of the last five {min(rss[-5:]) / MiB:.1f} MiB ({(min(rss[-5:]) / rss[0] - 1) * 100:+.1f}%), "
        f"peak {max(rss) / MiB:.1f} MiB; fds {fds[0]} → {fds[-1]}; threads {threads[0]} → {threads[-1]}"
    )
    print("RSS per cycle (MiB): " + " ".join(f"{r / MiB:.0f}" for r in rss))
    assert min(rss[-5:]) <= rss[0] * (1 + RSS_TOLERANCE)
    assert fds[-1] == fds[0], fds
    assert max(threads) <= threads[0] + EXECUTOR_THREADS - 1, threads
