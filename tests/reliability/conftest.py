"""Fixtures of the reliability suite: a background event loop for in-process servers, model
directories with fresh random weights (tiny, minimal, medium and slow copies), and the environment a
`modelworker serve` subprocess needs to find the slow test architecture through its entry point."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.serve_process import plugin_env_for
from tests.tiny_models import make_tiny_model_dir
from tests.worker import slow_arch

# The smallest model that is still a real transformer: loads in a few milliseconds.
MINI = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=64,
)
# ~21 MB of float32 weights: big enough that a leaked copy stands out of the RSS noise.
MEDIUM = dict(
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
SLOW_FORWARD_SECONDS = 0.6
SLOW_LOAD_SECONDS = 0.8


@pytest.fixture(scope="session")
def model_root(tmp_path_factory: pytest.TempPathFactory, weights_seed: int) -> Path:
    root = tmp_path_factory.mktemp("reliability-models")
    make_tiny_model_dir(root / "llama", "llama", seed=weights_seed)
    make_tiny_model_dir(root / "mini-a", "llama", seed=weights_seed + 1, **MINI)
    make_tiny_model_dir(root / "mini-b", "llama", seed=weights_seed + 2, **MINI)
    make_tiny_model_dir(root / "medium", "llama", seed=weights_seed + 3, **MEDIUM)
    slow_arch.make_slow_copy(root / "llama", root / "slow-forward", forward_seconds=SLOW_FORWARD_SECONDS)
    slow_arch.make_slow_copy(root / "llama", root / "slow-load", load_seconds=SLOW_LOAD_SECONDS)
    slow_arch.make_slow_copy(root / "mini-a", root / "mini-slow-load", load_seconds=SLOW_LOAD_SECONDS)
    return root


@pytest.fixture(scope="session")
def plugin_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment of a `modelworker serve` subprocess that registers the slow test architecture
    through the entry-point group `modelworker.architectures`, as a third-party package would."""
    return plugin_env_for(tmp_path_factory.mktemp("reliability-plugin"))
