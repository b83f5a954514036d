"""The threads that run model work, arranged so that the process has one OpenMP thread team.

libgomp gives every OS thread that starts a parallel region its own team of worker threads, and once
the process manages more OpenMP threads than it has CPUs it stops spinning between parallel regions
(its throttled spin count): every region then pays a futex wake-up. Measured on SmolLM2 on 2 cores,
a decode step took 50 ms instead of 32 ms as soon as a second thread had run torch work with 2
threads, and stayed there for the life of the process, in every thread.

So one primary thread runs model work with the worker's torch threads (`--threads`), and the other
threads that run tensor work (forwards that overlap the primary's, Loads, weight transfers) run with
one: they never start a parallel region. Forwards on different models still overlap (the second runs
on an overflow thread), as the concurrency contract asks. The event loop's thread is left alone: its
tensor work (requests and replies are built on the model's thread) is too small to start one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def use_threads(n: int) -> None:
    """This thread's torch intra-op threads, for good. ATen initializes a thread's count lazily, on
    its first parallel op, from the value the latest set_num_threads of any thread stored: trigger
    that first, or a later first op would overwrite the count set here."""
    torch.get_num_threads()
    torch.set_num_threads(n)


def single_threaded_executor(max_workers: int, thread_name_prefix: str) -> ThreadPoolExecutor:
    """An executor whose threads run torch ops on one intra-op thread (no OpenMP team of their own)."""
    return ThreadPoolExecutor(
        max_workers, thread_name_prefix=thread_name_prefix, initializer=use_threads, initargs=(1,)
    )


class ComputeThreads(Executor):
    """An executor for model work: a call runs on the primary thread (`threads` torch threads) when
    that thread is free, else on one of `overflow` threads (one torch thread each)."""

    def __init__(self, threads: int, overflow: int, thread_name_prefix: str = "model") -> None:
        self._primary = ThreadPoolExecutor(
            1,
            thread_name_prefix=f"{thread_name_prefix}-primary",
            initializer=use_threads,
            initargs=(threads,),
        )
        self._overflow = single_threaded_executor(overflow, thread_name_prefix)
        self._lock = threading.Lock()
        self._primary_calls = 0  # submitted to the primary thread and not finished

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        with self._lock:
            on_primary = self._primary_calls == 0
            if on_primary:
                self._primary_calls += 1
        if not on_primary:
            return self._overflow.submit(fn, *args, **kwargs)

        def run() -> T:
            try:
                return fn(*args, **kwargs)
            finally:
                with self._lock:
                    self._primary_calls -= 1

        try:
            return self._primary.submit(run)
        except BaseException:  # shut down: nothing will run it
            with self._lock:
                self._primary_calls -= 1
            raise

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._primary.shutdown(wait=wait, cancel_futures=cancel_futures)
        self._overflow.shutdown(wait=wait, cancel_futures=cancel_futures)
