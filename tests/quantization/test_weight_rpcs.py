"""Weight RPCs on quantized models through a real server: updates and broadcasts are refused with
FAILED_PRECONDITION naming the model and its quantization (nothing changes); ReleaseMemory keeps the
packed weights on the host and ResumeMemory brings back logits identical bit for bit."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from tests.tiny_models import make_tiny_model_dir
from tests.worker.harness import SMALL_KV, RunningServer, make_settings, start_server
from worker.client import FailedPreconditionError, ModelWorkerClient

from . import checkpoints as ck

TOKENS = np.random.default_rng(3).integers(0, 128, size=(2, 9))


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("qweights")
    make_tiny_model_dir(root / "dense", "llama", seed=11)
    ck.write_checkpoint(root / "gptq", ck.gptq_config(4, 32, False, True), ck.gptq_layer(4, 32, False, True))
    return root


@pytest.fixture(scope="module")
def client(aio_loop: asyncio.AbstractEventLoop, root: Path) -> Iterator[ModelWorkerClient]:
    running: RunningServer = start_server(aio_loop, make_settings(root))
    with ModelWorkerClient(running.target, timeout=60) as c:
        c.load("int8", "dense", quantization="int8", kv_cache=SMALL_KV)
        c.load("gptq", "gptq", kv_cache=SMALL_KV)
        yield c
    running.stop(grace=0.5)


def _logits(client: ModelWorkerClient, model_id: str) -> np.ndarray:
    return client.forward(model_id, TOKENS, logits_mode="all").logits


@pytest.mark.parametrize(("model_id", "label"), [("int8", "int8"), ("gptq", "gptq-int4-g32")])
def test_updates_are_refused_naming_the_quantization(client, root, model_id, label) -> None:
    before = _logits(client, model_id)
    dense = load_file(str(root / "dense" / "model.safetensors"))
    with pytest.raises(FailedPreconditionError, match=rf"{model_id!r} is quantized \({label}"):
        client.update_weights(model_id, "dense")
    with pytest.raises(FailedPreconditionError, match=rf"{model_id!r} is quantized \({label}"):
        client.update_weights_from_stream(model_id, dense)
    info = next(m for m in client.list_models() if m.id == model_id)
    assert info.weights_version == 0
    assert np.array_equal(_logits(client, model_id), before)


@pytest.mark.parametrize("model_id", ["int8", "gptq"])
def test_release_then_resume_gives_identical_logits(client, model_id) -> None:
    before = _logits(client, model_id)
    info = next(m for m in client.list_models() if m.id == model_id)
    released = client.release_memory(model_id)
    # Every resident byte is released, the packed codes and scales included.
    assert released.released_bytes == info.weight_bytes + info.kv_cache_bytes
    with pytest.raises(FailedPreconditionError, match="sleeping"):
        client.forward(model_id, TOKENS)
    assert client.resume_memory(model_id).resumed_bytes == released.released_bytes
    assert np.array_equal(_logits(client, model_id), before)


def test_release_without_a_host_copy_is_refused(client) -> None:
    with pytest.raises(FailedPreconditionError, match=r"'int8' is quantized \(int8\).*offload: true"):
        client.release_memory("int8", ["weights"], offload=False)
    assert next(m for m in client.list_models() if m.id == "int8").state == "READY"


def test_broadcast_to_a_quantized_model_is_refused_after_receiving(client, root) -> None:
    """Every announced tensor is still received (the trainer's collectives complete and the group
    stays usable), then FAILED_PRECONDITION naming the quantization; nothing changes."""
    import multiprocessing as mp

    from tests.weights.trainer import free_port, rounds, specs, trainer_main

    before = _logits(client, "int8")
    port, group = free_port(), "quant-sync"
    trainer = mp.get_context("spawn").Process(
        target=trainer_main, args=(port, group, str(root / "dense")), daemon=True
    )
    trainer.start()
    try:
        # The group is made for no model (InitWeightsGroup naming "int8" is refused at once).
        client.init_weights_group("127.0.0.1", port, 2, group, timeout_seconds=60)
        for tensors in rounds(root / "dense"):
            with pytest.raises(FailedPreconditionError, match=r"'int8' is quantized \(int8\)"):
                client.update_weights_from_distributed("int8", group, specs(tensors))
        client.destroy_weights_group(group)
        trainer.join(60)
        assert trainer.exitcode == 0
    finally:
        if trainer.is_alive():
            trainer.kill()
    assert np.array_equal(_logits(client, "int8"), before)
