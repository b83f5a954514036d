"""Every ModelWorker RPC end to end through the generated stubs, against a real server on loopback.
Logits are checked bit for bit against the same model called in-process, next tokens and top-k
against an independent float64 computation, ModelInfo against the checkpoint files."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from worker import __version__
from worker.pb.modelworker.v1 import worker_pb2 as pb
from worker.tensors import decode_tensor

from .harness import SMALL_KV, RunningServer, load_request, rpc_error


@pytest.fixture(scope="module")
def loaded(worker: RunningServer) -> RunningServer:
    stub = worker.stub()
    stub.Load(load_request("a", "llama-a"))
    stub.Load(load_request("q", "qwen"))
    return worker


@pytest.fixture
def rng() -> np.random.Generator:
    seed = random.randrange(2**31)
    print(f"seed {seed}")
    return np.random.default_rng(seed)


def in_process(server: RunningServer, model_id: str, fn):
    """Call the server's own model object in this thread, with exclusive access."""
    with torch.inference_mode(), server.registry.get_model_mut(model_id) as model:
        return fn(model)


def reference_top_k(logits: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 log-softmax and a stable descending sort, independent of torch.topk."""
    x = logits.double().numpy()
    logprobs = x - (
        np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) + x.max(-1, keepdims=True)
    )
    order = np.argsort(-logprobs, axis=-1, kind="stable")[:, :k]
    return order, np.take_along_axis(logprobs, order, -1)


def test_load_reports_the_checkpoint(loaded: RunningServer, model_root: Path) -> None:
    info = {m.id: m for m in loaded.stub().ListModels(pb.ListModelsRequest()).models}["a"]
    cfg = json.loads((model_root / "llama-a" / "config.json").read_text())
    with safe_open(model_root / "llama-a" / "model.safetensors", "pt") as f:
        tensors = [f.get_slice(name) for name in f.keys()]
        numel = sum(int(np.prod(t.get_shape())) for t in tensors)
    assert info.architecture == "LlamaForCausalLM" and info.state == pb.READY
    assert info.model_dir == str((model_root / "llama-a").resolve())
    assert (info.device, info.dtype, info.attention_backend) == ("cpu", "float32", "torch")
    assert info.num_parameters == numel and info.weight_bytes == 4 * numel
    assert (info.vocab_size, info.hidden_size, info.num_layers) == (
        cfg["vocab_size"],
        cfg["hidden_size"],
        cfg["num_hidden_layers"],
    )
    assert (info.num_attention_heads, info.num_kv_heads, info.head_dim) == (
        cfg["num_attention_heads"],
        cfg["num_key_value_heads"],
        cfg["hidden_size"] // cfg["num_attention_heads"],
    )
    assert info.max_position_embeddings == cfg["max_position_embeddings"] and info.sliding_window == 0
    assert (info.kv_block_size, info.kv_num_blocks, info.max_seq_len, info.max_batch_size) == (16, 64, 128, 2)
    per_token = 2 * info.num_layers * info.num_kv_heads * info.head_dim * 4
    assert info.kv_cache_bytes == per_token * (64 * 16 + 2 * 128)
    assert 0 < info.load_seconds < 60
    assert abs(info.loaded_at.ToNanoseconds() / 1e9 - time.time()) < 300
    assert not info.is_quant_model


def test_load_is_idempotent_for_the_same_spec(loaded: RunningServer, model_root: Path) -> None:
    stub = loaded.stub()
    first = {m.id: m for m in stub.ListModels(pb.ListModelsRequest()).models}["a"]
    # The same directory spelled absolutely, and the empty fields spelled out, are the same spec.
    again = stub.Load(
        load_request(
            "a", str(model_root / "llama-a"), dtype="float32", device="cpu", attention_backend="auto"
        )
    )
    assert again.already_loaded
    assert again.model.loaded_at == first.loaded_at and again.model.load_seconds == first.load_seconds
    # "auto" on CPU is float32, so it names the same spec as well.
    assert stub.Load(load_request("a", "llama-a", dtype="auto")).already_loaded


def test_list_architectures_and_info(loaded: RunningServer, model_root: Path) -> None:
    stub = loaded.stub()
    archs = list(stub.ListArchitectures(pb.ListArchitecturesRequest()).architectures)
    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "SlowLlamaForCausalLM"} <= set(
        archs
    )
    assert archs == sorted(archs)
    info = stub.Info(pb.InfoRequest())
    assert info.version == __version__
    cpu = info.devices[0]
    assert cpu.name == "cpu" and 0 < cpu.free_memory_bytes <= cpu.total_memory_bytes
    assert (info.default_device, info.default_dtype) == ("cpu", "float32")
    assert "torch" in info.attention_backends
    s = loaded.server.settings
    assert (
        info.limits.max_message_bytes,
        info.limits.max_tokens_per_request,
        info.limits.max_batch_size,
    ) == (
        s.max_message_bytes,
        s.max_tokens_per_request,
        s.max_batch_size,
    )
    assert list(info.model_roots) == [os.path.realpath(model_root)]
    assert list(info.architectures) == archs


@pytest.mark.parametrize(
    ("mode", "wire_dtype"),
    [
        (pb.LOGITS_LAST, pb.DTYPE_UNSPECIFIED),
        (pb.LOGITS_ALL, pb.FLOAT32),
        (pb.LOGITS_ALL, pb.FLOAT16),
        (pb.LOGITS_LAST, pb.BFLOAT16),
        (pb.LOGITS_NONE, pb.FLOAT32),
    ],
)
@pytest.mark.parametrize("model_id", ["a", "q"])
def test_forward_matches_the_in_process_call(
    loaded: RunningServer, rng: np.random.Generator, model_id: str, mode: int, wire_dtype: int
) -> None:
    batch, seq, k = 2, int(rng.integers(3, 9)), 5
    tokens = rng.integers(0, 128, size=(batch, seq))
    reply = loaded.stub().Forward(
        pb.ForwardRequest(
            model_id=model_id,
            token_ids=tokens.ravel().tolist(),
            batch_size=batch,
            logits_mode=mode,
            logits_dtype=wire_dtype,
            top_k=k,
        )
    )
    # The same call in-process: every row for LOGITS_ALL, the last positions only otherwise.
    all_rows = mode == pb.LOGITS_ALL
    ref = in_process(
        loaded, model_id, lambda m: m.forward(torch.from_numpy(tokens), None, all_logits=all_rows)
    )
    assert ref.dtype == torch.float32 and ref.shape == ((batch, seq, 128) if all_rows else (batch, 128))
    last = ref[:, -1] if all_rows else ref
    want_dtype = {pb.FLOAT16: torch.float16, pb.BFLOAT16: torch.bfloat16}.get(wire_dtype, torch.float32)
    rows = ref.reshape(batch * seq, 128) if all_rows else ref
    if mode == pb.LOGITS_NONE:
        assert not reply.HasField("logits")
    else:
        got = decode_tensor(reply.logits)
        assert list(reply.logits.shape) == list(rows.shape)
        assert len(reply.logits.data) == rows.numel() * want_dtype.itemsize
        # Bit-identical: the very values the in-process call returns, converted to the wire dtype.
        assert got.dtype == want_dtype and torch.equal(got, rows.to(want_dtype))
    assert list(reply.next_token_ids) == np.argmax(last.double().numpy(), axis=-1).tolist()
    want_ids, want_lp = reference_top_k(rows, k)
    assert [list(t.token_ids) for t in reply.top_k] == want_ids.tolist()
    got_lp = np.array([list(t.logprobs) for t in reply.top_k])
    np.testing.assert_allclose(got_lp, want_lp, rtol=0, atol=1e-5)
    assert reply.compute_seconds > 0


def test_forward_positions_and_start_pos(loaded: RunningServer, rng: np.random.Generator) -> None:
    stub = loaded.stub()
    tokens = rng.integers(0, 128, size=6).tolist()
    start = int(rng.integers(1, 100))
    by_start = stub.Forward(pb.ForwardRequest(model_id="a", token_ids=tokens, start_pos=start))
    explicit = list(range(start, start + 6))
    by_positions = stub.Forward(pb.ForwardRequest(model_id="a", token_ids=tokens, positions=explicit))
    from_zero = stub.Forward(pb.ForwardRequest(model_id="a", token_ids=tokens))
    assert by_start.logits.data == by_positions.logits.data
    ref = in_process(
        loaded, "a", lambda m: m.forward(torch.tensor([tokens]), torch.tensor([explicit]), all_logits=False)
    )
    assert torch.equal(decode_tensor(by_start.logits), ref)
    assert by_start.logits.data != from_zero.logits.data  # RoPE sees the positions


def test_forward_with_cache_slice_and_reset(loaded: RunningServer, rng: np.random.Generator) -> None:
    stub = loaded.stub()
    stub.ResetCache(pb.ResetCacheRequest(model_id="a"))
    tokens = rng.integers(0, 128, size=(2, 7))
    prefill = stub.Forward(
        pb.ForwardRequest(
            model_id="a", token_ids=tokens[:, :6].ravel().tolist(), batch_size=2, use_cache=True
        )
    )
    decode = stub.Forward(
        pb.ForwardRequest(
            model_id="a", token_ids=tokens[:, 6].tolist(), batch_size=2, use_cache=True, start_pos=6, top_k=3
        )
    )
    stateless = in_process(loaded, "a", lambda m: m.forward(torch.from_numpy(tokens), None, all_logits=True))
    torch.testing.assert_close(decode_tensor(prefill.logits), stateless[:, 5], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(decode_tensor(decode.logits), stateless[:, 6], rtol=1e-5, atol=1e-5)
    assert list(decode.next_token_ids) == stateless[:, 6].argmax(-1).tolist()

    sliced = stub.SliceKvCache(pb.SliceKvCacheRequest(model_id="a", layer_idx=1, start_pos=2, length=5))
    k, v = decode_tensor(sliced.key), decode_tensor(sliced.value)
    assert sliced.key.dtype == pb.FLOAT32 and list(sliced.key.shape) == [2, 2, 5, 16]
    ref_k, ref_v = in_process(loaded, "a", lambda m: m.slice_kv_cache(1, 2, 5))
    assert torch.equal(k, ref_k) and torch.equal(v, ref_v) and bool(k.abs().sum() > 0)

    stub.ResetCache(pb.ResetCacheRequest(model_id="a"))
    zeroed = stub.SliceKvCache(pb.SliceKvCacheRequest(model_id="a", layer_idx=1, start_pos=0, length=7))
    assert not decode_tensor(zeroed.key).any() and not decode_tensor(zeroed.value).any()
    # The reset rows hold nothing, so a decode at position 6 would read a hole.
    err = rpc_error(
        lambda: stub.Forward(pb.ForwardRequest(model_id="a", token_ids=[1], use_cache=True, start_pos=6))
    )
    assert err.code().name == "INVALID_ARGUMENT" and "gap" in err.details()


def test_forward_paged_prefill_then_decode(loaded: RunningServer, rng: np.random.Generator) -> None:
    """Two sequences prefilled into scattered blocks, then one decode step; the logits equal the
    dense stateless forward of the same tokens, and bit for bit the in-process forward_paged."""
    stub = loaded.stub()
    lengths = [int(rng.integers(17, 40)), int(rng.integers(2, 16))]
    seqs = [rng.integers(0, 128, size=n + 1) for n in lengths]  # the extra token is the decode step
    blocks = rng.permutation(64)[:8].tolist()
    tables = [blocks[:3], blocks[3:5]]

    def slots(table: list[int], positions: range) -> list[int]:
        return [table[p // 16] * 16 + p % 16 for p in positions]

    prefill = pb.ForwardPagedRequest(
        model_id="a",
        input_tokens=np.concatenate([s[:n] for s, n in zip(seqs, lengths, strict=True)]).tolist(),
        positions=[p for n in lengths for p in range(n)],
        block_tables=[pb.BlockTable(block_ids=t) for t in tables],
        slot_mapping=[x for t, n in zip(tables, lengths, strict=True) for x in slots(t, range(n))],
        context_lens=lengths,
        is_prefill=True,
        logits_mode=pb.LOGITS_ALL,
    )
    got_prefill = stub.ForwardPaged(prefill)
    decode = pb.ForwardPagedRequest(
        model_id="a",
        input_tokens=[int(s[n]) for s, n in zip(seqs, lengths, strict=True)],
        positions=lengths,
        block_tables=[pb.BlockTable(block_ids=t) for t in tables],
        slot_mapping=[slots(t, range(n, n + 1))[0] for t, n in zip(tables, lengths, strict=True)],
        context_lens=[n + 1 for n in lengths],
        is_prefill=False,
        top_k=4,
    )
    got_decode = stub.ForwardPaged(decode)

    all_rows = decode_tensor(got_prefill.logits)
    assert list(all_rows.shape) == [sum(lengths), 128]
    for i, (s, n) in enumerate(zip(seqs, lengths, strict=True)):
        dense = in_process(
            loaded, "a", lambda m, s=s: m.forward(torch.from_numpy(s)[None], None, all_logits=True)
        )[0]
        offset = sum(lengths[:i])
        torch.testing.assert_close(all_rows[offset : offset + n], dense[:n], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(decode_tensor(got_decode.logits)[i], dense[n], rtol=1e-4, atol=1e-4)
        assert got_prefill.next_token_ids[i] == int(all_rows[offset + n - 1].argmax())
        assert got_decode.next_token_ids[i] == int(decode_tensor(got_decode.logits)[i].argmax())
    assert [len(t.token_ids) for t in got_decode.top_k] == [4, 4]
    # The same decode in-process rewrites the same slots with the same K/V: identical logits.
    again = in_process(
        loaded,
        "a",
        lambda m: m.forward_paged(
            torch.tensor(list(decode.input_tokens)),
            torch.tensor(list(decode.positions)),
            tables,
            torch.tensor(list(decode.slot_mapping)),
            list(decode.context_lens),
            False,
        ),
    )
    assert torch.equal(decode_tensor(got_decode.logits), again)


def test_unload_frees_and_forgets(worker: RunningServer) -> None:
    stub = worker.stub()
    info = stub.Load(load_request("gone", "llama-b")).model
    reply = stub.Unload(pb.UnloadRequest(model_id="gone"))
    assert reply.freed_bytes == info.weight_bytes + info.kv_cache_bytes
    assert reply.unload_seconds > 0
    assert "gone" not in [m.id for m in stub.ListModels(pb.ListModelsRequest()).models]
    assert rpc_error(lambda: stub.Forward(pb.ForwardRequest(model_id="gone", token_ids=[1]))).code().name == (
        "NOT_FOUND"
    )
    # The id is free again, for any spec.
    again = stub.Load(load_request("gone", "llama-a", kv_cache=SMALL_KV))
    assert not again.already_loaded
    stub.Unload(pb.UnloadRequest(model_id="gone"))
