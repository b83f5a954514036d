"""A failed Load hands its memory back before the next Load's admission looks (CUDA paths, run on
CPU through a stand-in of torch's caching allocator).

On CUDA, memory a dropped tensor held stays reserved in torch's caching allocator until
`torch.cuda.empty_cache()`, and `mem_get_info` (what admission reads) counts it as used. So
`empty_cache` must run after the half-built model is dropped, on every failed Load; before, it ran
only for out-of-memory, while the build's frame still held the weights, and retries were refused
with RESOURCE_EXHAUSTED until some Unload emptied the cache."""

from __future__ import annotations

import weakref
from pathlib import Path

import pytest
import torch

from registry import LoadOptions, LoadPlan, ModelRegistry
from registry.errors import InvalidConfig, OutOfResources

from .toy import TOY_ARCH, Tracker, toy_builder, write_toy_dir

TOTAL = 1000
WEIGHTS = 600


class _Block:
    """Device memory held by a tensor of the half-built model."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes


class StandInAllocator:
    """torch's caching allocator as admission sees it: freed blocks stay reserved until empty_cache."""

    def __init__(self) -> None:
        self.in_use = 0
        self.cached = 0
        self.empty_cache_calls = 0

    def alloc(self, nbytes: int) -> _Block:
        self.in_use += nbytes
        block = _Block(nbytes)
        weakref.finalize(block, self._freed, nbytes)
        return block

    def _freed(self, nbytes: int) -> None:
        self.in_use -= nbytes
        self.cached += nbytes

    def empty_cache(self) -> None:
        self.empty_cache_calls += 1
        self.cached = 0

    def free_bytes(self) -> int:  # mem_get_info()[0]
        return TOTAL - self.in_use - self.cached


@pytest.fixture
def allocator(monkeypatch: pytest.MonkeyPatch) -> StandInAllocator:
    stand_in = StandInAllocator()
    monkeypatch.setattr(torch.cuda, "empty_cache", stand_in.empty_cache)
    # The load plan reads the free memory of a CUDA device (its KV budget) through mem_get_info.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (stand_in.free_bytes(), TOTAL))
    return stand_in


FAILURES = {
    "out of memory, as the builder reports it": lambda: OutOfResources(
        "out of memory on cuda:0 while loading"
    ),
    "out of memory, raw": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    "a wrong-shape tensor": lambda: InvalidConfig(
        "model.layers.0.mlp.up_proj.weight: shape [3, 4], expected [4, 4]"
    ),
}


@pytest.mark.parametrize("failure", list(FAILURES))
def test_a_failed_load_frees_its_memory_for_the_retry(
    tmp_path: Path, allocator: StandInAllocator, failure: str
) -> None:
    root = tmp_path / "models"
    write_toy_dir(root / "m")
    registry = ModelRegistry(device="cuda", model_roots=[root])
    tracker = Tracker()
    registry.register_architecture(TOY_ARCH, toy_builder(tracker))
    registry.register_architecture("HalfBuilt", _failing_builder(allocator, FAILURES[failure]))
    admitted: list[int] = []

    def admission(plan: LoadPlan) -> None:
        free = allocator.free_bytes()
        admitted.append(free)
        if free < WEIGHTS:
            raise OutOfResources(f"needs {WEIGHTS} bytes, {free} free")

    options = LoadOptions(device="cpu")  # the toy builds on CPU; the registry's device is "cuda"
    with pytest.raises(type(FAILURES[failure]())):
        registry.load("broken", root / "m", "HalfBuilt", admission=admission)
    assert allocator.in_use == 0 and allocator.cached == 0, "the failed model's blocks are still held"
    assert allocator.empty_cache_calls == 1
    assert registry.list_models() == []
    # The retry (another id, another architecture) is admitted with the whole device free.
    registry.load("retry", root / "m", TOY_ARCH, options, admission=admission)
    assert admitted == [TOTAL, TOTAL]


def test_a_failed_cpu_load_does_not_touch_cuda(tmp_path: Path, allocator: StandInAllocator) -> None:
    root = tmp_path / "models"
    write_toy_dir(root / "m")
    registry = ModelRegistry(device="cpu", model_roots=[root])
    registry.register_architecture("HalfBuilt", _failing_builder(allocator, FAILURES["a wrong-shape tensor"]))
    with pytest.raises(InvalidConfig):
        registry.load("broken", root / "m", "HalfBuilt")
    assert allocator.empty_cache_calls == 0


def _failing_builder(allocator: StandInAllocator, error):
    """Allocates the weights, then fails while its frame still holds them (as load_weights does)."""

    def build(model_dir: Path, device: torch.device, options: LoadOptions):
        weights = allocator.alloc(WEIGHTS)  # noqa: F841 -- held by this frame when the error is raised
        raise error()

    return build
