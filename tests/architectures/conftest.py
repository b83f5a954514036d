from __future__ import annotations

import random

import pytest


@pytest.fixture
def seed() -> int:
    """A fresh seed per test (printed on failure through the assertion messages)."""
    return random.randrange(2**31)
