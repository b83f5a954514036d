"""BackendRegistry: names, lazy factories, probes with reasons and `auto` by priority."""

from __future__ import annotations

import pytest
import torch

from registry import BackendRegistry, BackendRequirements, InvalidArgument


class Fake:
    def __init__(self, name: str) -> None:
        self.name = name


def needs_cuda_bf16(r: BackendRequirements) -> str | None:
    if r.device.type != "cuda":
        return f"it needs CUDA, and the model is on {r.device}"
    if r.dtype is not None and r.dtype != torch.bfloat16:
        return "it needs bfloat16"
    return None


@pytest.fixture
def backends() -> tuple[BackendRegistry[Fake], list[str]]:
    made: list[str] = []

    def factory(name: str):  # type: ignore[no-untyped-def]
        return lambda: made.append(name) or Fake(name)

    reg: BackendRegistry[Fake] = BackendRegistry()
    reg.register("torch", factory("torch"))
    reg.register("fast", factory("fast"), needs_cuda_bf16, priority=100)
    reg.register("Mid", factory("mid"), needs_cuda_bf16, priority=50)
    return reg, made


CPU = BackendRequirements(torch.device("cpu"), torch.float32, 16, 64)
CUDA_BF16 = BackendRequirements(torch.device("cuda"), torch.bfloat16, 256, 64)


def test_names_and_check_name(backends) -> None:  # type: ignore[no-untyped-def]
    reg, made = backends
    assert reg.names() == ("torch", "fast", "mid")
    assert [reg.check_name(n) for n in ("", "AUTO", " Fast ", "torch")] == ["auto", "auto", "fast", "torch"]
    with pytest.raises(
        InvalidArgument, match=r"attention_backend 'xformers' is not known \(valid: auto, torch, fast, mid\)"
    ):
        reg.check_name("xformers")
    assert made == []  # nothing is built by asking


def test_auto_takes_the_available_backend_of_highest_priority(backends) -> None:  # type: ignore[no-untyped-def]
    reg, made = backends
    assert reg.resolve("auto", CPU) == "torch"
    assert reg.resolve("auto", CUDA_BF16) == "fast"
    assert reg.select("", CPU).name == "torch" and made == ["torch"]  # the factory runs on select only


def test_a_named_backend_that_cannot_run_says_why(backends) -> None:  # type: ignore[no-untyped-def]
    reg, made = backends
    with pytest.raises(
        InvalidArgument, match="attention_backend fast cannot run: it needs CUDA, and the model is on cpu"
    ):
        reg.select("fast", CPU)
    assert (
        reg.unavailable_reason("mid", BackendRequirements(torch.device("cuda"), torch.float16))
        == "it needs bfloat16"
    )
    assert made == []


def test_available_asks_the_probes_per_device(backends) -> None:  # type: ignore[no-untyped-def]
    reg, _ = backends
    assert reg.available(torch.device("cpu")) == ["torch"]
    assert reg.available(torch.device("cpu"), torch.device("cuda")) == ["torch", "fast", "mid"]


@pytest.mark.parametrize("name", ["", "auto", " AUTO "])
def test_auto_cannot_be_registered(name: str) -> None:
    with pytest.raises(InvalidArgument, match="other than auto"):
        BackendRegistry().register(name, lambda: Fake(name))


def test_builtin_backends_are_registered_by_register_builtin() -> None:
    from architectures import register_builtin
    from registry import ModelRegistry

    reg = ModelRegistry()
    register_builtin(reg)
    assert reg.attention_backends.names() == ("torch", "flash_attn", "triton")
    assert reg.attention_backends.available(torch.device("cpu")) == ["torch"]
    preferred = [
        reg.attention_backends.preferred_block_size(n, CPU) for n in ("torch", "flash_attn", "triton")
    ]
    assert preferred == [None, 256, None]


def test_preferred_block_size_follows_the_backend_a_load_would_run() -> None:
    """The block size is left open (requirements.block_size is ignored); `auto` takes the preference
    of the backend it resolves to; a named backend keeps its own even where it cannot run."""
    reg: BackendRegistry[Fake] = BackendRegistry()
    reg.register("torch", lambda: Fake("torch"))
    reg.register("paged256", lambda: Fake("paged256"), needs_cuda_bf16, priority=100, block_size=256)
    cuda_fp16 = BackendRequirements(torch.device("cuda"), torch.float16, 16, 64)
    assert reg.preferred_block_size("auto", CUDA_BF16) == 256
    assert (
        reg.preferred_block_size("auto", BackendRequirements(torch.device("cuda"), torch.bfloat16, 16)) == 256
    )
    assert reg.preferred_block_size("auto", cuda_fp16) is None  # auto runs torch there
    assert reg.preferred_block_size("auto", CPU) is None
    assert reg.preferred_block_size("torch", CUDA_BF16) is None
    assert reg.preferred_block_size("paged256", CPU) == 256
    with pytest.raises(InvalidArgument, match="is not known"):
        reg.preferred_block_size("xformers", CPU)


@pytest.mark.parametrize("bad", [0, -256, True, 25.6])
def test_a_preferred_block_size_must_be_a_positive_integer(bad) -> None:  # type: ignore[no-untyped-def]
    reg: BackendRegistry[Fake] = BackendRegistry()
    with pytest.raises(InvalidArgument, match="block_size must be a positive integer"):
        reg.register("odd", lambda: Fake("odd"), block_size=bad)
    assert reg.names() == ()
