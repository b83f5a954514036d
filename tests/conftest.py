"""Fixtures shared by every test package."""

from __future__ import annotations

import asyncio
import os
import random
import threading
from collections.abc import Iterator

import pytest
import torch

import architectures  # noqa: F401  (sets MKL_CBWR before this process's first GEMM)

# Without CUDA the triton backend's kernels run under the Triton interpreter, which must be chosen
# before anything (transformers does) imports triton: triton.language's own helpers are decorated
# then. With CUDA they compile, and the interpreter tests skip (tests/triton_interpreter.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def aio_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """One event loop on a background thread for the in-process servers of the whole session."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="aio-server", daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


@pytest.fixture(scope="session")
def weights_seed() -> int:
    """A fresh seed for the tiny models' random weights, printed so a failure can be replayed."""
    seed = random.randrange(2**31)
    print(f"tiny model weights seed {seed}")  # shown with the first failing test's output
    return seed
