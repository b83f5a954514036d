"""UpdateWeights and UpdateWeightsFromStream on a real worker: the result equals a fresh Load of the
new checkpoint bit for bit; every refused update leaves the old weights serving."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import torch

from worker.client import (
    FailedPreconditionError,
    InvalidArgumentError,
    ModelWorkerClient,
    NotFoundError,
    PermissionDeniedError,
)
from worker.client_weights import weight_chunks
from worker.pb.modelworker.v1 import worker_pb2_grpc as pb_grpc

from .conftest import SMALL_KV
from .helpers import TOKENS, assert_unchanged, checkpoint, logits


def test_update_from_directory_equals_a_fresh_load(client, loaded, reference) -> None:
    assert np.array_equal(logits(client, loaded), reference["llama-a"])
    result = client.update_weights(loaded, "llama-b")
    assert result.weights_version == 1
    assert result.num_tensors > 0 and result.bytes > 0
    out = client.forward(loaded, TOKENS, logits_mode="all")
    assert np.array_equal(out.logits, reference["llama-b"])
    assert out.weights_version == 1
    info = next(m for m in client.list_models() if m.id == loaded)
    assert (info.weights_version, info.state, info.released) == (1, "READY", ())
    assert client.update_weights(loaded, "llama-a").weights_version == 2
    assert np.array_equal(logits(client, loaded), reference["llama-a"])


@pytest.mark.parametrize("chunk_bytes", [1000, 1 << 24])
def test_update_from_stream_equals_a_fresh_load(client, loaded, reference, update_root, chunk_bytes) -> None:
    tensors = checkpoint(update_root, "llama-b")
    result = client.update_weights_from_stream(loaded, tensors, chunk_bytes=chunk_bytes)
    assert result.weights_version == 1
    assert np.array_equal(logits(client, loaded), reference["llama-b"])


def test_stream_in_bfloat16_converts_like_a_load(client, loaded, update_root, tmp_path) -> None:
    """A bfloat16 stream into a float32 model gives what loading a bfloat16 checkpoint gives."""
    from safetensors.torch import save_file

    tensors = {k: v.to(torch.bfloat16) for k, v in checkpoint(update_root, "llama-b").items()}
    client.update_weights_from_stream(loaded, tensors)
    bf16_dir = update_root / "llama-b-bf16"
    if not bf16_dir.exists():
        bf16_dir.mkdir()
        (bf16_dir / "config.json").write_text((update_root / "llama-b" / "config.json").read_text())
        save_file(tensors, str(bf16_dir / "model.safetensors"))
    client.load("ref-bf16", "llama-b-bf16", dtype="float32", kv_cache=SMALL_KV)
    try:
        assert np.array_equal(logits(client, loaded), logits(client, "ref-bf16"))
    finally:
        client.unload("ref-bf16")


def test_refused_directory_updates_keep_the_old_weights(client, loaded, reference, update_root) -> None:
    with pytest.raises(InvalidArgumentError) as exc:
        client.update_weights(loaded, "qwen")  # q/k/v biases the Llama has no parameter for
    assert "unexpected" in exc.value.details and "q_proj.bias" in exc.value.details
    with pytest.raises(NotFoundError):
        client.update_weights(loaded, "no-such-checkpoint")
    with pytest.raises(PermissionDeniedError):
        client.update_weights(loaded, "../outside")
    with pytest.raises(NotFoundError):
        client.update_weights("no-such-model", "llama-b")
    assert_unchanged(client, loaded, reference)


def _bad_streams(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[dict[str, torch.Tensor], str]]:
    name = "model.layers.0.self_attn.q_proj.weight"
    wrong_shape = dict(tensors)
    wrong_shape[name] = tensors[name][:-1]
    missing = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.down_proj.weight"}
    unknown = dict(tensors)
    unknown["model.layers.0.self_attn.extra.weight"] = torch.zeros(3)
    return {
        "wrong shape": (wrong_shape, f"{name} is [63, 64], expected [64, 64]"),
        "missing": (missing, "missing 1 weight(s): model.layers.1.mlp.down_proj.weight"),
        "unknown name": (unknown, "unexpected 1 weight(s): model.layers.0.self_attn.extra.weight"),
    }


def test_refused_streams_keep_the_old_weights(client, loaded, reference, update_root) -> None:
    for case, (tensors, message) in _bad_streams(checkpoint(update_root, "llama-b")).items():
        with pytest.raises(InvalidArgumentError) as exc:
            client.update_weights_from_stream(loaded, tensors, chunk_bytes=4096)
        assert message in exc.value.details, case
    assert_unchanged(client, loaded, reference)


def test_stream_cut_in_the_middle_of_a_tensor(worker, client, loaded, reference, update_root) -> None:
    chunks = list(weight_chunks(loaded, checkpoint(update_root, "llama-b"), chunk_bytes=4096))
    cut = len(chunks) // 2
    assert chunks[cut].offset > 0 or chunks[cut + 1].offset > 0  # the cut falls inside a tensor
    stub = pb_grpc.ModelWorkerStub(worker.channel())
    with pytest.raises(grpc.RpcError) as exc:
        stub.UpdateWeightsFromStream(iter(chunks[:cut]), timeout=30)
    assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "incomplete tensor" in exc.value.details()
    assert_unchanged(client, loaded, reference)


def test_cancelled_stream_keeps_the_old_weights(worker, client, loaded, reference, update_root) -> None:
    chunks = list(weight_chunks(loaded, checkpoint(update_root, "llama-b"), chunk_bytes=4096))
    sent_half = threading.Event()
    never = threading.Event()

    def stall() -> Iterator:
        yield from chunks[: len(chunks) // 2]
        sent_half.set()
        never.wait(30)  # the client cancels meanwhile

    stub = pb_grpc.ModelWorkerStub(worker.channel())
    future = stub.UpdateWeightsFromStream.future(stall(), timeout=30)
    assert sent_half.wait(30)
    future.cancel()
    never.set()
    with pytest.raises(grpc.FutureCancelledError):
        future.result()
    assert_unchanged(client, loaded, reference)


def test_malformed_streams(worker, client, loaded, reference, update_root) -> None:
    stub = pb_grpc.ModelWorkerStub(worker.channel())
    chunks = list(weight_chunks(loaded, checkpoint(update_root, "llama-b"), chunk_bytes=4096))
    no_id = list(chunks)
    no_id[0] = type(chunks[0])(
        name=chunks[0].name, tensor=chunks[0].tensor, total_bytes=chunks[0].total_bytes
    )
    out_of_order = [chunks[0], chunks[2]]
    twice = [c for c in chunks if c.name == chunks[0].name] * 2
    cases = {
        "empty": ([], "stream is empty"),
        "no model_id": (no_id, "must name model_id"),
        "pieces out of order": (out_of_order, "expected 4096"),
        "sent twice": (twice, "sent twice"),
    }
    for case, (messages, text) in cases.items():
        with pytest.raises(grpc.RpcError) as exc:
            stub.UpdateWeightsFromStream(iter(messages), timeout=30)
        assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT, case
        assert text in exc.value.details(), (case, exc.value.details())
    assert_unchanged(client, loaded, reference)


def test_update_refused_while_weights_are_released(client, loaded, reference) -> None:
    client.release_memory(loaded, ["weights"])
    with pytest.raises(FailedPreconditionError, match="ResumeMemory"):
        client.update_weights(loaded, "llama-b")
    client.resume_memory(loaded)
    assert_unchanged(client, loaded, reference)


def test_forwards_racing_updates_see_all_old_or_all_new(worker, client, loaded, reference) -> None:
    """Forwards and updates from A to B and back interleave; every forward's logits are exactly
    A's or exactly B's, and its weights_version says which (even: A, odd: B)."""
    stop = threading.Event()
    seen: list[tuple[int, bool, bool]] = []
    errors: list[BaseException] = []

    def forwards() -> None:
        with ModelWorkerClient(worker.target, timeout=60) as c:
            while not stop.is_set():
                try:
                    out = c.forward(loaded, TOKENS, logits_mode="all")
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)
                    return
                is_a = np.array_equal(out.logits, reference["llama-a"])
                is_b = np.array_equal(out.logits, reference["llama-b"])
                seen.append((out.weights_version, is_a, is_b))

    threads = [threading.Thread(target=forwards) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for i in range(6):
            client.update_weights(loaded, "llama-b" if i % 2 == 0 else "llama-a")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors
    assert seen
    for version, is_a, is_b in seen:
        assert (is_a, is_b) == ((True, False) if version % 2 == 0 else (False, True)), version


def test_async_client_twins(worker, loaded, reference, update_root) -> None:
    import asyncio

    from worker.client import AsyncModelWorkerClient

    async def run() -> tuple[int, int, np.ndarray]:
        async with AsyncModelWorkerClient(worker.target, timeout=60) as c:
            disk = await c.update_weights(loaded, "llama-b")
            stream = await c.update_weights_from_stream(loaded, checkpoint(update_root, "llama-a"))
            await c.release_memory(loaded, offload=True)
            await c.resume_memory(loaded)
            out = await c.forward(loaded, TOKENS, logits_mode="all")
            return disk.weights_version, stream.weights_version, out.logits

    disk, stream, out = asyncio.run(run())
    assert (disk, stream) == (1, 2)
    assert np.array_equal(out, reference["llama-a"])


def test_stream_of_a_checkpoint_that_fuses_qkv_and_gate_up(client, loaded, reference, update_root) -> None:
    """A trainer whose model fuses q/k/v and gate/up sends the fused tensors: same weights."""
    tensors = checkpoint(update_root, "llama-b")
    fused: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if ".q_proj." in name:
            parts = [tensors[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            fused[name.replace("q_proj", "qkv_proj")] = torch.cat(parts)
        elif ".gate_proj." in name:
            parts = [tensors[name.replace("gate_proj", p)] for p in ("gate_proj", "up_proj")]
            fused[name.replace("gate_proj", "gate_up_proj")] = torch.cat(parts)
        elif not any(p in name for p in (".k_proj.", ".v_proj.", ".up_proj.")):
            fused[name] = t
    client.update_weights_from_stream(loaded, fused)
    assert np.array_equal(logits(client, loaded), reference["llama-b"])
    both = dict(
        fused, **{"model.layers.0.self_attn.k_proj.weight": tensors["model.layers.0.self_attn.k_proj.weight"]}
    )
    with pytest.raises(InvalidArgumentError, match="all fill"):
        client.update_weights_from_stream(loaded, both)
