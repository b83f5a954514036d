"""Fixtures shared by every test package."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Iterator

import pytest


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
