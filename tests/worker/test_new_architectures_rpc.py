"""The new architectures through a real server on loopback: ListArchitectures names them, a tiny
Qwen3-MoE and a tiny Gemma 2 (softcaps, windows) load and Forward the logits transformers computes,
and a checkpoint missing one expert's tensor fails its Load with INVALID_ARGUMENT naming the tensor
while the server keeps serving."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file

from worker.pb.modelworker.v1 import worker_pb2 as pb
from worker.tensors import decode_tensor

from .harness import RunningServer, load_request, make_settings, rpc_error, start_server

transformers = pytest.importorskip("transformers")

NEW = (
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
    "Qwen2MoeForCausalLM",
    "MixtralForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Phi3ForCausalLM",
)
BASE = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)
MISSING = "model.layers.1.mlp.experts.2.up_proj.weight"


def _reference(config_cls: str, model_cls: str, seed: int, **overrides) -> torch.nn.Module:
    config = getattr(transformers, config_cls)(**BASE, **overrides)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def refs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.nn.Module]]:
    root = tmp_path_factory.mktemp("new-arch-models")
    models = {
        "moe": _reference(
            "Qwen3MoeConfig",
            "Qwen3MoeForCausalLM",
            1,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
        ),
        "gemma": _reference(
            "Gemma2Config",
            "Gemma2ForCausalLM",
            2,
            head_dim=16,
            sliding_window=4,
            attn_logit_softcapping=0.8,
            final_logit_softcapping=3.0,
        ),
    }
    for name, model in models.items():
        model.save_pretrained(root / name)
    broken = root / "moe-missing-expert"
    broken.mkdir()
    (broken / "config.json").write_text((root / "moe" / "config.json").read_text())
    tensors = load_file(root / "moe" / "model.safetensors")
    del tensors[MISSING]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    return root, models


@pytest.fixture(scope="module")
def server(aio_loop: asyncio.AbstractEventLoop, refs) -> Iterator[RunningServer]:
    running = start_server(aio_loop, make_settings(refs[0]))
    yield running
    running.stop(grace=0.5)


def test_new_architectures_serve_transformers_logits(server: RunningServer, refs) -> None:
    stub = server.stub()
    names = set(stub.ListArchitectures(pb.ListArchitecturesRequest()).architectures)
    assert set(NEW) <= names
    gen = torch.Generator().manual_seed(3)
    for model_id, model in refs[1].items():
        stub.Load(load_request(model_id, model_id))
        tokens = torch.randint(3, 64, (1, 9), generator=gen)
        reply = stub.Forward(
            pb.ForwardRequest(model_id=model_id, token_ids=tokens[0].tolist(), logits_mode=pb.LOGITS_ALL)
        )
        with torch.no_grad():
            want = model(tokens).logits[0]
        err = float((decode_tensor(reply.logits) - want).abs().max())
        assert err <= 1e-4, f"{model_id}: Forward differs from transformers by {err}"


def test_missing_expert_fails_the_load_and_the_server_keeps_serving(server: RunningServer, refs) -> None:
    stub = server.stub()
    err = rpc_error(lambda: stub.Load(load_request("broken", "moe-missing-expert")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert MISSING in err.details() and "missing" in err.details()
    assert "broken" not in {m.id for m in stub.ListModels(pb.ListModelsRequest()).models}
    stub.Load(load_request("moe", "moe"))  # already loaded or loads now: either way it serves
    reply = stub.Forward(pb.ForwardRequest(model_id="moe", token_ids=[5, 6, 7]))
    assert list(decode_tensor(reply.logits).shape) == [1, 64]
