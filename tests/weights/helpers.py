"""Shared helpers of the weight-update tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from worker.client import ModelWorkerClient

TOKENS = np.random.default_rng(7).integers(0, 128, size=(2, 9))


def logits(client: ModelWorkerClient, model_id: str) -> np.ndarray:
    return client.forward(model_id, TOKENS, logits_mode="all").logits


def checkpoint(root: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(root / name / "model.safetensors"))


def assert_unchanged(client: ModelWorkerClient, model_id: str, reference: dict[str, np.ndarray]) -> None:
    assert np.array_equal(logits(client, model_id), reference["llama-a"])
    info = next(m for m in client.list_models() if m.id == model_id)
    assert info.weights_version == 0
