"""Fixtures: a background event loop for in-process servers, and a root with one tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_models import make_tiny_model_dir


@pytest.fixture(scope="session")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    make_tiny_model_dir(root / "llama", "llama", seed=7)
    return root
