"""A model loaded with compile_decode follows UpdateWeights and ReleaseMemory/ResumeMemory: its
compiled decode steps read the weights the model holds now (the graph takes them as inputs, it
never bakes them in), equal to an eager Load of the same checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

from tests.compiler import can_compile
from worker.client import ModelWorkerClient

from .conftest import SMALL_KV

pytestmark = pytest.mark.skipif(
    not can_compile(), reason="torch.compile needs a C++ compiler (g++ or $CXX) and Python's headers"
)

PROMPT = [3, 1, 4, 1, 5]
STEPS = [9, 2, 6, 5]


def _decode(client: ModelWorkerClient, model_id: str) -> np.ndarray:
    """Logits of a prompt then one-token steps at positions 5.. (compiled from position 2 on)."""
    client.forward(model_id, PROMPT, use_cache=True)
    rows = []
    for i, token in enumerate(STEPS):
        reply = client.forward(model_id, [token], use_cache=True, start_pos=len(PROMPT) + i)
        rows.append(np.asarray(reply.logits))
    return np.stack(rows)


def test_compiled_steps_follow_an_update_and_a_release(client: ModelWorkerClient) -> None:
    compiled = client.load("cd-upd", "llama-a", kv_cache=SMALL_KV, compile_decode=True).model
    assert compiled.compile_seconds > 0
    client.load("cd-eager-a", "llama-a", kv_cache=SMALL_KV)
    client.load("cd-eager-b", "llama-b", kv_cache=SMALL_KV)
    try:
        a, b = _decode(client, "cd-eager-a"), _decode(client, "cd-eager-b")
        assert np.abs(a - b).max() > 1e-2  # the two checkpoints decode differently
        np.testing.assert_allclose(_decode(client, "cd-upd"), a, rtol=0, atol=1e-5)
        client.update_weights("cd-upd", "llama-b")
        np.testing.assert_allclose(_decode(client, "cd-upd"), b, rtol=0, atol=1e-5)
        client.release_memory("cd-upd")
        client.resume_memory("cd-upd")
        np.testing.assert_allclose(_decode(client, "cd-upd"), b, rtol=0, atol=1e-5)
    finally:
        for model_id in ("cd-upd", "cd-eager-a", "cd-eager-b"):
            client.unload(model_id)
