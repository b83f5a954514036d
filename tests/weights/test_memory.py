"""ReleaseMemory / ResumeMemory on a real worker: SLEEPING refuses forwards, resume gives the same
logits bit for bit, whichever way the weights come back (host copy, re-read from the Load's or the
last update's directory)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from worker.client import FailedPreconditionError, InvalidArgumentError, NotFoundError

from .conftest import SMALL_KV
from .helpers import TOKENS, checkpoint, logits


def info(client, model_id):
    return next(m for m in client.list_models() if m.id == model_id)


def test_release_both_then_resume(client, loaded, reference) -> None:
    before = info(client, loaded)
    result = client.release_memory(loaded)
    assert result.released_bytes == before.weight_bytes + before.kv_cache_bytes
    sleeping = info(client, loaded)
    assert (sleeping.state, sleeping.released) == ("SLEEPING", ("weights", "kv_cache"))
    with pytest.raises(FailedPreconditionError, match="sleeping"):
        client.forward(loaded, TOKENS)
    with pytest.raises(FailedPreconditionError):
        client.forward_paged(loaded, [1, 2], [0, 1], [[0]], [0, 1], [2], is_prefill=True)
    with pytest.raises(FailedPreconditionError):
        client.reset_cache(loaded)
    # Releasing again frees nothing more.
    assert client.release_memory(loaded).released_bytes == 0
    resumed = client.resume_memory(loaded)
    assert resumed.resumed_bytes == result.released_bytes
    after = info(client, loaded)
    assert (after.state, after.released, after.weights_version) == ("READY", (), 0)
    assert np.array_equal(logits(client, loaded), reference["llama-a"])


@pytest.mark.parametrize("offload", [True, False])
def test_weights_only_with_and_without_host_copy(client, loaded, reference, offload) -> None:
    client.release_memory(loaded, ["weights"], offload=offload)
    assert info(client, loaded).released == ("weights",)
    client.resume_memory(loaded, ["kv_cache"])  # not released: nothing to do
    assert info(client, loaded).state == "SLEEPING"
    client.resume_memory(loaded, ["weights"])
    assert np.array_equal(logits(client, loaded), reference["llama-a"])


def test_kv_cache_comes_back_empty(client, loaded) -> None:
    client.forward(loaded, TOKENS, use_cache=True)  # rows 0..1 hold 9 tokens each
    client.release_memory(loaded, ["kv_cache"])
    client.resume_memory(loaded, ["kv_cache"])
    with pytest.raises(InvalidArgumentError, match="gap"):  # the rows hold nothing any more
        client.forward(loaded, TOKENS[:, :1], use_cache=True, start_pos=9)
    k, v = client.slice_kv_cache(loaded, 0, 0, 9).key, client.slice_kv_cache(loaded, 0, 0, 9).value
    assert not k.any() and not v.any()


def test_resume_reads_the_last_update_again(client, loaded, reference) -> None:
    client.update_weights(loaded, "llama-b")
    client.release_memory(loaded, offload=False)
    client.resume_memory(loaded)
    assert np.array_equal(logits(client, loaded), reference["llama-b"])
    assert info(client, loaded).weights_version == 1


def test_streamed_weights_are_kept_on_the_host(client, loaded, reference, update_root) -> None:
    client.update_weights_from_stream(loaded, checkpoint(update_root, "llama-b"))
    with pytest.raises(FailedPreconditionError, match="offload: true"):
        client.release_memory(loaded, ["weights"], offload=False)
    client.release_memory(loaded, ["weights"])  # offload unset: a host copy, nothing to re-read
    client.resume_memory(loaded)
    assert np.array_equal(logits(client, loaded), reference["llama-b"])


def test_resume_fails_cleanly_when_the_checkpoint_is_gone(client, update_root, reference) -> None:
    shutil.copytree(update_root / "llama-a", update_root / "llama-a-copy", dirs_exist_ok=True)
    client.load("gone", "llama-a-copy", kv_cache=SMALL_KV)
    try:
        client.release_memory("gone", ["weights"])
        shutil.rmtree(update_root / "llama-a-copy")
        with pytest.raises(FailedPreconditionError, match="cannot read its weights again"):
            client.resume_memory("gone")
        assert info(client, "gone").state == "SLEEPING"
        shutil.copytree(update_root / "llama-a", update_root / "llama-a-copy")
        client.resume_memory("gone")
        assert np.array_equal(logits(client, "gone"), reference["llama-a"])
    finally:
        client.unload("gone")


def test_bad_requests(client, loaded) -> None:
    with pytest.raises(InvalidArgumentError, match="unknown memory tag"):
        client.release_memory(loaded, ["weights", "activations"])
    with pytest.raises(NotFoundError):
        client.release_memory("no-such-model")
    with pytest.raises(NotFoundError):
        client.resume_memory("no-such-model")
    assert info(client, loaded).state == "READY"


def test_unload_a_sleeping_model(client) -> None:
    client.load("sleeper", "llama-a", kv_cache=SMALL_KV)
    client.release_memory("sleeper")
    client.unload("sleeper")
    assert "sleeper" not in [m.id for m in client.list_models()]


def test_tied_embeddings_stay_tied_through_update_and_release(client, update_root) -> None:
    """An update of embed_tokens reaches lm_head (they are one parameter), also after a release."""
    client.load("tied-ref", "tied-b", kv_cache=SMALL_KV)
    expected = logits(client, "tied-ref")
    client.unload("tied-ref")
    client.load("tied", "tied-a", kv_cache=SMALL_KV)
    try:
        client.release_memory("tied", offload=False)
        client.resume_memory("tied")
        tensors = checkpoint(update_root, "tied-b")
        assert "lm_head.weight" not in tensors
        client.update_weights_from_stream("tied", tensors)
        assert np.array_equal(logits(client, "tied"), expected)
        client.release_memory("tied", ["weights"])  # streamed: kept on the host
        client.resume_memory("tied")
        assert np.array_equal(logits(client, "tied"), expected)
    finally:
        client.unload("tied")
