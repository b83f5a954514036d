"""UpdateWeightsFromDistributed: a trainer process (rank 0) broadcasts a checkpoint over gloo and
the worker's weights become that checkpoint's, bit for bit; a refused set leaves the old weights and
the group usable."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pytest

from worker.client import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)

from .helpers import assert_unchanged
from .trainer import BAD_TENSOR, free_port, rounds, specs, trainer_main


def test_gloo_broadcast_equals_a_fresh_load(client, loaded, reference, update_root) -> None:
    port, group = free_port(), "rl-sync"
    proc = mp.get_context("spawn").Process(
        target=trainer_main, args=(port, group, str(update_root / "llama-b")), daemon=True
    )
    proc.start()
    try:
        client.init_weights_group("127.0.0.1", port, 2, group, model_id=loaded, timeout_seconds=60)
        with pytest.raises(AlreadyExistsError):
            client.init_weights_group("127.0.0.1", port, 2, group, model_id=loaded)
        bad, good = rounds(update_root / "llama-b")
        with pytest.raises(
            InvalidArgumentError, match=f"{BAD_TENSOR} is \\[63, 64\\], expected \\[64, 64\\]"
        ):
            client.update_weights_from_distributed(loaded, group, specs(bad))
        assert_unchanged(client, loaded, reference)
        result = client.update_weights_from_distributed(loaded, group, specs(good))
        assert result.weights_version == 1 and result.num_tensors == len(good)
        out = client.forward(loaded, np.asarray(reference["tokens"]), logits_mode="all")
        assert np.array_equal(out.logits, reference["llama-b"]) and out.weights_version == 1
        client.destroy_weights_group(group)
        proc.join(60)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()
    with pytest.raises(NotFoundError):
        client.update_weights_from_distributed(loaded, group, specs(good))


def test_group_requests_are_checked(client, loaded) -> None:
    with pytest.raises(InvalidArgumentError, match="rank"):
        client.init_weights_group("127.0.0.1", 29500, 2, "g", rank_offset=0)
    with pytest.raises(InvalidArgumentError, match="group_name"):
        client.init_weights_group("127.0.0.1", 29500, 2, "bad name")
    with pytest.raises(InvalidArgumentError, match="nccl"):
        client.init_weights_group("127.0.0.1", 29500, 2, "g", model_id=loaded, backend="nccl")
    with pytest.raises(NotFoundError):
        client.destroy_weights_group("never-made")
    # Nobody listens at the port: the rendezvous gives up after timeout_seconds.
    with pytest.raises(FailedPreconditionError, match="could not join"):
        client.init_weights_group("127.0.0.1", free_port(), 2, "lonely", timeout_seconds=1)
