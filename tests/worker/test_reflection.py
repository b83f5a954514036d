"""Server reflection as grpcurl uses it: a client with no generated code lists the services, calls
ListModels and Forward with JSON, and every grpcurl command of the README's walkthrough runs against a
real server with its output checked against the README's (same keys, same types, same enum values)."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from tests.tiny_models import make_tiny_model_dir

from .harness import RunningServer, load_request, make_settings, start_server
from .reflection_client import ReflectionClient

README = Path(__file__).resolve().parents[2] / "README.md"
SERVICES = ["grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "modelworker.v1.ModelWorker"]
# Values that must match the README exactly; the rest depend on the model and only keep their type.
EXACT_KEYS = {"status", "id", "architecture", "device", "dtype", "state", "attentionBackend", "alreadyLoaded"}


@pytest.fixture(scope="module")
def demo_like(
    aio_loop: asyncio.AbstractEventLoop, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """A root whose `smollm2-135m` is a tiny Llama with SmolLM2's vocabulary and context length, so
    the README's token ids and model names work unchanged; loaded as `make run` preloads it."""
    root = tmp_path_factory.mktemp("demo-root")
    make_tiny_model_dir(
        root / "smollm2-135m", "llama", seed=7, vocab_size=49152, max_position_embeddings=8192
    )
    running = start_server(aio_loop, make_settings(root))
    running.stub().Load(load_request("smollm2-135m", "smollm2-135m"))
    yield running
    running.stop(grace=0.5)


@pytest.fixture(scope="module")
def client(demo_like: RunningServer) -> ReflectionClient:
    return ReflectionClient(demo_like.channel())


def test_reflection_lists_every_service(client: ReflectionClient) -> None:
    assert client.services() == SERVICES
    methods = [m.name for m in client.pool.FindServiceByName("modelworker.v1.ModelWorker").methods]
    assert methods == [
        "Load",
        "Unload",
        "Forward",
        "ForwardPaged",
        "ListModels",
        "ListArchitectures",
        "ResetCache",
        "SliceKvCache",
        "Info",
        "UpdateWeights",
        "UpdateWeightsFromStream",
        "InitWeightsGroup",
        "UpdateWeightsFromDistributed",
        "DestroyWeightsGroup",
        "ReleaseMemory",
        "ResumeMemory",
        "ExportKvBlocks",
        "ImportKvBlocks",
    ]


def test_list_models_and_forward_through_reflection_only(
    client: ReflectionClient, demo_like: RunningServer
) -> None:
    models = client.call("modelworker.v1.ModelWorker/ListModels")["models"]
    assert [(m["id"], m["state"], m["vocabSize"]) for m in models] == [("smollm2-135m", "READY", 49152)]
    rng = np.random.default_rng()
    tokens = rng.integers(0, 49152, size=6).tolist()
    reply = client.call(
        "modelworker.v1.ModelWorker/Forward",
        json.dumps({"modelId": "smollm2-135m", "tokenIds": tokens, "logitsDtype": "BFLOAT16", "topK": 2}),
    )
    logits = reply["logits"]
    assert logits["dtype"] == "BFLOAT16" and logits["shape"] == ["1", "49152"]  # int64 as strings
    got = torch.frombuffer(bytearray(base64.b64decode(logits["data"])), dtype=torch.bfloat16)
    with torch.inference_mode(), demo_like.registry.get_model_mut("smollm2-135m") as model:
        ref = model.forward(torch.tensor([tokens]), None, all_logits=False)[0]
    assert torch.equal(got, ref.to(torch.bfloat16))
    assert reply["nextTokenIds"] == [int(ref.argmax())] and reply["topK"][0]["tokenIds"][0] == int(
        ref.argmax()
    )


# -- the README ----------------------------------------------------------------------------------
def walkthrough_blocks() -> list[tuple[str, str]]:
    text = README.read_text()
    section = text.split("## grpcurl walkthrough", 1)[1].split("\n## ", 1)[0]
    return [(m.group(1), m.group(2)) for m in re.finditer(r"```(\w*)\n(.*?)```", section, re.S)]


def walkthrough_commands() -> list[tuple[str, tuple[str, str] | None]]:
    """(command, the output block shown right after it, if any)."""
    blocks = walkthrough_blocks()
    out = []
    for i, (lang, body) in enumerate(blocks):
        if lang != "sh":
            continue
        commands = [
            c.strip() for c in body.replace("\\\n", " ").splitlines() if c.strip().startswith("grpcurl")
        ]
        shown = blocks[i + 1] if i + 1 < len(blocks) and blocks[i + 1][0] in ("json", "text") else None
        out.extend((c, shown if len(commands) == 1 else None) for c in commands)
    return out


def parse_grpcurl(command: str) -> tuple[dict[str, str], list[str]]:
    args = shlex.split(command)
    assert args[0] == "grpcurl"
    flags: dict[str, str] = {}
    i = 1
    while args[i].startswith("-"):
        if args[i] in ("-d", "-H", "-cacert", "-cert", "-key"):
            flags[args[i]] = args[i + 1]
            i += 2
        else:
            assert args[i] == "-plaintext", f"unexpected grpcurl flag {args[i]}"
            flags[args[i]] = ""
            i += 1
    assert args[i] == "localhost:50051", "the walkthrough talks to `make run`"
    return flags, args[i + 1 :]


def same_shape(shown: Any, real: Any, path: str = "") -> None:
    if isinstance(shown, dict):
        assert isinstance(real, dict), path
        for key, value in shown.items():
            assert key in real, f"{path}.{key} is shown in the README but not returned"
            if key in EXACT_KEYS:
                assert real[key] == value, f"{path}.{key}: README {value!r}, worker {real[key]!r}"
            same_shape(value, real[key], f"{path}.{key}")
    elif isinstance(shown, list):
        assert isinstance(real, list) and len(real) == len(shown), path
        for a, b in zip(shown, real, strict=True):
            same_shape(a, b, path + "[]")
    else:
        assert type(shown) is type(real), f"{path}: README {shown!r}, worker {real!r}"


def grpc_code_name(code: grpc.StatusCode) -> str:
    return "".join(part.capitalize() for part in code.name.split("_"))  # grpcurl's spelling


def test_readme_walkthrough_runs_as_written(client: ReflectionClient) -> None:
    commands = walkthrough_commands()
    assert len(commands) >= 8
    ran = 0
    for command, shown in commands:
        flags, rest = parse_grpcurl(command)
        if "-plaintext" not in flags:  # the TLS + auth example: its method must exist
            client.method(rest[0])
            continue
        if rest[0] == "list":
            real = (
                client.services()
                if len(rest) == 1
                else [m.full_name for m in client.method(rest[1] + ".x").containing_service.methods]
            )
            if shown:
                assert shown[1].split() == real, command
        elif rest[0] == "describe":
            symbol = rest[1]
            try:
                client.pool.FindServiceByName(symbol)
            except KeyError:
                client.pool.FindMessageTypeByName(symbol)
        else:
            try:
                real = client.call(rest[0], flags.get("-d", "{}"))
            except grpc.RpcError as exc:
                assert shown and shown[1].startswith("ERROR:"), f"{command} failed: {exc.details()}"
                assert (
                    f"Code: {grpc_code_name(exc.code())}" in shown[1]
                    and f"Message: {exc.details()}" in shown[1]
                )
            else:
                if shown:
                    same_shape(json.loads(shown[1]), real, rest[0])
        ran += 1
    assert ran >= 8
    # The walkthrough left the server as it found it.
    assert [m["id"] for m in client.call("modelworker.v1.ModelWorker/ListModels")["models"]] == [
        "smollm2-135m"
    ]


def test_readme_load_twice_is_already_loaded(client: ReflectionClient) -> None:
    load = next(c for c, _ in walkthrough_commands() if c.endswith("ModelWorker/Load"))
    body = parse_grpcurl(load)[0]["-d"]
    first = client.call("modelworker.v1.ModelWorker/Load", body)
    again = client.call("modelworker.v1.ModelWorker/Load", body)
    assert "alreadyLoaded" not in first and again["alreadyLoaded"] is True
    client.call("modelworker.v1.ModelWorker/Unload", json.dumps({"model_id": first["model"]["id"]}))
