"""--cpu-gemm: settings from every source, LoadRequest.cpu_gemm over gRPC (and its
INVALID_ARGUMENT), ModelInfo.cpu_gemm, and the two kernels' logits side by side."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from architectures import cpu_gemm
from registry.cpu_gemm import CPU_GEMMS as REGISTRY_GEMMS
from registry.cpu_gemm import resolve_cpu_gemm
from worker import __main__ as cli
from worker.pb.modelworker.v1 import worker_pb2 as pb
from worker.settings import CPU_GEMMS, SettingsError, build_settings

from .harness import RunningServer, load_request, make_settings, rpc_error, start_server


def test_cpu_gemm_from_every_source(tmp_path: Path) -> None:
    assert CPU_GEMMS == REGISTRY_GEMMS  # the settings check the registry's names without importing torch
    assert build_settings({}, {}, None).cpu_gemm == "auto"
    config = tmp_path / "w.toml"
    config.write_text('cpu-gemm = "torch"\n')
    assert build_settings({}, {}, config).cpu_gemm == "torch"
    env = {"MODELWORKER_CPU_GEMM": "OneDNN"}
    assert build_settings({}, env, config).cpu_gemm == "onednn"
    args = cli.build_parser().parse_args(["serve", "--cpu-gemm", "torch"])
    assert cli.settings_from_args(args, env=env).cpu_gemm == "torch"
    args = cli.build_parser().parse_args(["serve", "--cpu-gemm", "MV+oneDNN"])
    assert cli.settings_from_args(args, env=env).cpu_gemm == "mv+onednn"
    with pytest.raises(
        SettingsError,
        match="MODELWORKER_CPU_GEMM: must be one of auto, torch, onednn, mv[+]torch, mv[+]onednn, "
        "onednn[+]torch, torch[+]onednn, got 'mkl'",
    ):
        build_settings({}, {"MODELWORKER_CPU_GEMM": "mkl"}, None)


@pytest.fixture(scope="module")
def onednn_worker(aio_loop: asyncio.AbstractEventLoop, model_root: Path) -> Iterator[RunningServer]:
    """A worker whose default kernel is onednn."""
    running = start_server(aio_loop, make_settings(model_root, cpu_gemm="onednn"))
    yield running
    running.stop(grace=0.5)


def _logits(stub, model_id: str, tokens: tuple[int, ...] = (3, 1, 4, 1, 5, 9, 2, 6)) -> np.ndarray:
    request = pb.ForwardRequest(model_id=model_id, token_ids=tokens, logits_mode=pb.LOGITS_ALL)
    t = stub.Forward(request, timeout=30).logits
    return np.frombuffer(t.data, dtype=np.float32).reshape(tuple(t.shape))


def test_cpu_gemm_over_grpc(worker: RunningServer, onednn_worker: RunningServer, monkeypatch) -> None:
    # the in-process servers' tiny models run oneDNN in every layer (architectures/cpu_gemm.py)
    monkeypatch.setattr(cpu_gemm, "KERNEL_MIN_WEIGHT", 0)
    stub = worker.stub()
    auto = stub.Load(load_request("gemm-auto", "llama-a"), timeout=60).model
    plain = stub.Load(load_request("gemm-torch", "llama-a", cpu_gemm="torch"), timeout=60).model
    onednn = stub.Load(load_request("gemm-onednn", "llama-a", cpu_gemm="ONEDNN"), timeout=60).model
    mv = stub.Load(load_request("gemm-mv", "llama-a", cpu_gemm="mv+torch"), timeout=60).model
    by_default = onednn_worker.stub().Load(load_request("gemm-default", "llama-a"), timeout=60).model
    try:
        assert auto.cpu_gemm == resolve_cpu_gemm("auto", torch.device("cpu"), torch.float32)
        assert (plain.cpu_gemm, onednn.cpu_gemm, by_default.cpu_gemm) == ("torch", "onednn", "onednn")
        listed = {m.id: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
        assert listed["gemm-onednn"].cpu_gemm == "onednn" and mv.cpu_gemm == "mv+torch"
        one_row = _logits(stub, "gemm-torch", (7,))  # one token: torch.mv's GEMV under mv+torch
        np.testing.assert_allclose(_logits(stub, "gemm-mv", (7,)), one_row, rtol=0, atol=1e-5)
        a, b = _logits(stub, "gemm-torch"), _logits(stub, "gemm-onednn")
        assert a.shape == b.shape == (8, auto.vocab_size)
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
        err = rpc_error(lambda: stub.Load(load_request("gemm-bad", "llama-a", cpu_gemm="mkl"), timeout=30))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "cpu_gemm 'mkl' is not one of auto, torch, onednn, mv+torch" in err.details()
        models = {m.id for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
        assert "gemm-bad" not in models and "gemm-torch" in models  # nothing lost, still serving
        np.testing.assert_array_equal(_logits(stub, "gemm-torch"), a)
    finally:
        for model_id in ("gemm-auto", "gemm-torch", "gemm-onednn", "gemm-mv"):
            stub.Unload(pb.UnloadRequest(model_id=model_id), timeout=30)
        onednn_worker.stub().Unload(pb.UnloadRequest(model_id="gemm-default"), timeout=30)


# Records where the worker runs auto's measurement: the thread's name and its torch thread count.
CALIBRATION_PROBE = """
import threading
import architectures, torch
import worker.servicer as servicer
from registry import ModelRegistry
from worker.settings import Settings

torch.set_num_threads(2)
calls = []
measure = servicer.calibrate_cpu_gemm
def recorded():
    calls.append((threading.current_thread().name, torch.get_num_threads()))
    return measure()
servicer.calibrate_cpu_gemm = recorded
servicer.ModelWorkerServicer(ModelRegistry(device="cpu"), Settings(device="cpu", threads=1)).close()
print(calls)
"""


def test_the_worker_measures_on_its_primary_compute_thread() -> None:
    """auto's measurement runs at start, on the thread forwards run on and with their thread count
    (--threads 1 here, while the main thread has 2), not at the first Load on a Load thread."""
    out = subprocess.run(
        [sys.executable, "-c", CALIBRATION_PROBE], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[('model-primary_0', 1)]", out.stderr
