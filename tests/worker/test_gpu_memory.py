"""GPU memory reads create no CUDA context on devices the worker does not use (worker/gpu_memory.py),
and Info runs its probes off the event loop. CUDA and NVML are CPU stand-ins here: a process with
a context on cuda:0 only, on a two-GPU host."""

from __future__ import annotations

import asyncio
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from worker import devices as dev
from worker import gpu_memory
from worker.metrics import DeviceMemoryCollector
from worker.pb.modelworker.v1 import worker_pb2 as pb

GIB = 1 << 30


class StandInCuda:
    """torch.cuda's answers on a host with two 80 GiB GPUs; this process has a context on cuda:0."""

    def __init__(self) -> None:
        self.mem_get_info_calls: list[int] = []
        self.contexts = {0}

    def mem_get_info(self, index: int) -> tuple[int, int]:
        self.mem_get_info_calls.append(index)
        self.contexts.add(index)  # what the real call does to a device without a context
        return 70 * GIB, 80 * GIB

    def properties(self, index: int) -> SimpleNamespace:
        return SimpleNamespace(uuid=f"uuid-{index}", total_memory=80 * GIB, name="Stand-in H100")


def _nvml_module(reads: list[str]) -> types.ModuleType:
    module = types.ModuleType("pynvml")
    module.nvmlInit = lambda: None
    module.nvmlDeviceGetHandleByUUID = lambda uuid: reads.append(uuid) or uuid
    module.nvmlDeviceGetHandleByIndex = lambda index: pytest.fail("NVML indices differ from torch's")
    module.nvmlDeviceGetMemoryInfo = lambda handle: SimpleNamespace(
        total=80 * GIB, free=33 * GIB, used=47 * GIB
    )
    return module


@pytest.fixture
def cuda(monkeypatch: pytest.MonkeyPatch) -> StandInCuda:
    stand_in = StandInCuda()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", stand_in.mem_get_info)
    monkeypatch.setattr(torch.cuda, "get_device_properties", stand_in.properties)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "Stand-in H100")
    monkeypatch.setattr(
        torch.cuda, "memory_allocated", lambda index: 5 * GIB if index == 0 else pytest.fail()
    )
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda index: 6 * GIB if index == 0 else pytest.fail())
    monkeypatch.setattr(torch._C, "_cuda_hasPrimaryContext", lambda i: i in stand_in.contexts, raising=False)
    gpu_memory._reset_for_tests()
    yield stand_in
    gpu_memory._reset_for_tests()


def test_info_devices_read_untouched_gpus_through_nvml(cuda: StandInCuda, monkeypatch) -> None:
    reads: list[str] = []
    monkeypatch.setitem(sys.modules, "pynvml", _nvml_module(reads))
    cpu, gpu0, gpu1 = dev.all_devices()
    assert cpu.name == "cpu"
    assert (gpu0.name, gpu0.free_bytes, gpu0.total_bytes) == ("cuda:0", 70 * GIB, 80 * GIB)  # torch: exact
    assert (gpu1.name, gpu1.free_bytes, gpu1.total_bytes) == ("cuda:1", 33 * GIB, 80 * GIB)  # NVML
    assert gpu1.description == "Stand-in H100"
    assert reads == ["GPU-uuid-1"], "NVML is asked by UUID (its numbering is not torch's)"
    assert cuda.mem_get_info_calls == [0] and cuda.contexts == {0}, "a context was created on cuda:1"


def test_without_nvml_an_untouched_gpu_reports_its_total_only(cuda: StandInCuda, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails: not installed
    gpu1 = dev.all_devices()[2]
    assert (gpu1.free_bytes, gpu1.total_bytes) == (0, 80 * GIB)
    assert "free memory unknown: nvidia-ml-py unavailable" in gpu1.description
    assert cuda.contexts == {0}


def test_admission_of_a_load_onto_a_gpu_reads_it_exactly(cuda: StandInCuda, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _nvml_module([]))
    assert dev.free_bytes(torch.device("cuda", 1)) == 70 * GIB  # the Load makes a context there anyway
    assert cuda.mem_get_info_calls == [1]


def test_a_scrape_creates_no_context_either(cuda: StandInCuda, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _nvml_module([]))
    (family,) = DeviceMemoryCollector().collect()
    series = {(s.labels["device"], s.labels["kind"]): s.value for s in family.samples}
    assert series[("cuda:0", "free")] == 70 * GIB and series[("cuda:0", "allocated")] == 5 * GIB
    assert series[("cuda:1", "free")] == 33 * GIB and series[("cuda:1", "total")] == 80 * GIB
    assert ("cuda:1", "allocated") not in series  # no allocator (and no context) of ours there
    assert cuda.mem_get_info_calls == [0] and cuda.contexts == {0}


def test_info_probes_run_off_the_event_loop(worker, monkeypatch: pytest.MonkeyPatch) -> None:
    where: list[str] = []

    def probe() -> list[dev.DeviceMemory]:
        try:
            asyncio.get_running_loop()
            where.append("event loop")
        except RuntimeError:
            where.append("thread")
        return [dev.DeviceMemory("cpu", "probe", 2, 1)]

    monkeypatch.setattr(dev, "all_devices", probe)
    info = worker.stub().Info(pb.InfoRequest())
    assert where == ["thread"]
    assert [(d.name, d.total_memory_bytes, d.free_memory_bytes) for d in info.devices] == [("cpu", 2, 1)]
    assert info.attention_backends == ["torch"]
