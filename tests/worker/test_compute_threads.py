"""worker/compute_threads.py: model work runs on the primary thread with the worker's torch threads
while it is free and overflows onto single-threaded threads while it is busy, so the process keeps one
OpenMP thread team; Loads and weight transfers run single-threaded too."""

from __future__ import annotations

import threading

import pytest
import torch

from worker.compute_threads import ComputeThreads, single_threaded_executor


def _where() -> tuple[str, int]:
    return threading.current_thread().name, torch.get_num_threads()


def test_calls_use_the_primary_thread_while_it_is_free() -> None:
    pool = ComputeThreads(3, overflow=2)
    try:
        seen = [pool.submit(_where).result(timeout=30) for _ in range(5)]
        assert seen == [("model-primary_0", 3)] * 5
    finally:
        pool.shutdown()


def test_calls_overflow_single_threaded_while_the_primary_is_busy() -> None:
    pool = ComputeThreads(3, overflow=2)
    release, started = threading.Event(), threading.Event()

    def hold() -> tuple[str, int]:
        started.set()
        assert release.wait(30)
        return _where()

    try:
        held = pool.submit(hold)
        assert started.wait(30)
        overflowed = [pool.submit(_where).result(timeout=30) for _ in range(3)]
        assert {name.rsplit("_", 1)[0] for name, _ in overflowed} == {"model"}
        assert {threads for _, threads in overflowed} == {1}
        release.set()
        assert held.result(timeout=30) == ("model-primary_0", 3)
        assert pool.submit(_where).result(timeout=30) == ("model-primary_0", 3)  # free again
    finally:
        release.set()
        pool.shutdown()


def test_an_exception_frees_the_primary_and_reaches_the_caller() -> None:
    pool = ComputeThreads(2, overflow=1)

    def fail() -> None:
        raise ValueError("broken model")

    try:
        with pytest.raises(ValueError, match="broken model"):
            pool.submit(fail).result(timeout=30)
        assert pool.submit(_where).result(timeout=30) == ("model-primary_0", 2)
    finally:
        pool.shutdown()


def test_after_shutdown_submit_raises_and_counts_nothing() -> None:
    pool = ComputeThreads(2, overflow=1)
    pool.shutdown()
    with pytest.raises(RuntimeError):
        pool.submit(_where)
    assert pool._primary_calls == 0


def test_single_threaded_executors_run_torch_on_one_thread() -> None:
    pool = single_threaded_executor(2, "load")
    try:
        name, threads = pool.submit(_where).result(timeout=30)
        assert name.startswith("load_") and threads == 1
    finally:
        pool.shutdown()
