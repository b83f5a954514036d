"""--load-mode and --threads: settings from every source, LoadRequest.load_mode over gRPC (and its
INVALID_ARGUMENT), ModelInfo.load_mode / mapped_weight_bytes, Info.threads from a real serve process."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from tests.serve_process import ServeLog
from worker import __main__ as cli
from worker.pb.modelworker.v1 import worker_pb2 as pb
from worker.pb.modelworker.v1 import worker_pb2_grpc as pb_grpc
from worker.settings import SettingsError, build_settings, effective_threads

from .harness import RunningServer, load_request, make_settings, rpc_error, start_server


def test_load_mode_and_threads_from_every_source(tmp_path: Path) -> None:
    assert (build_settings({}, {}, None).load_mode, build_settings({}, {}, None).threads) == ("mmap", 0)
    config = tmp_path / "w.toml"
    config.write_text('load-mode = "copy"\nthreads = 3\n')
    assert (build_settings({}, {}, config).load_mode, build_settings({}, {}, config).threads) == ("copy", 3)
    env = {"MODELWORKER_LOAD_MODE": "MMAP", "MODELWORKER_THREADS": "2"}
    s = build_settings({}, env, config)
    assert (s.load_mode, s.threads) == ("mmap", 2)
    args = cli.build_parser().parse_args(["serve", "--load-mode", "copy", "--threads", "1"])
    s = cli.settings_from_args(args, env=env)
    assert (s.load_mode, s.threads) == ("copy", 1)
    with pytest.raises(SettingsError, match="MODELWORKER_LOAD_MODE: must be one of mmap, copy, got 'lazy'"):
        build_settings({}, {"MODELWORKER_LOAD_MODE": "lazy"}, None)
    with pytest.raises(SettingsError, match=r"--threads: must be >= 0"):
        build_settings({"threads": "-1"}, {}, None)


def test_default_threads_follow_omp_then_the_affinity() -> None:
    import os

    assert effective_threads(5, {"OMP_NUM_THREADS": "2"}) == 5
    assert effective_threads(0, {"OMP_NUM_THREADS": "3"}) == 3
    assert effective_threads(0, {}) == len(os.sched_getaffinity(0))
    assert effective_threads(0, {"OMP_NUM_THREADS": "x"}) == len(os.sched_getaffinity(0))


@pytest.fixture(scope="module")
def copy_worker(aio_loop: asyncio.AbstractEventLoop, model_root: Path) -> Iterator[RunningServer]:
    """A worker whose default load mode is copy."""
    running = start_server(aio_loop, make_settings(model_root, load_mode="copy"))
    yield running
    running.stop(grace=0.5)


def test_load_mode_over_grpc(worker: RunningServer, copy_worker: RunningServer) -> None:
    stub = worker.stub()
    mapped = stub.Load(load_request("lm-mapped", "llama-a"), timeout=60).model
    copied = stub.Load(load_request("lm-copied", "llama-a", load_mode="copy"), timeout=60).model
    by_default = copy_worker.stub().Load(load_request("lm-default", "llama-a"), timeout=60).model
    try:
        assert (mapped.load_mode, copied.load_mode, by_default.load_mode) == ("mmap", "copy", "copy")
        assert 0 < mapped.mapped_weight_bytes < mapped.weight_bytes  # the fused q/k/v is copied
        assert copied.mapped_weight_bytes == by_default.mapped_weight_bytes == 0
        assert mapped.weight_bytes == copied.weight_bytes
        listed = {m.id: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
        assert listed["lm-mapped"].mapped_weight_bytes == mapped.mapped_weight_bytes
        ids = pb.ForwardRequest(model_id="lm-mapped", token_ids=[3, 1, 4, 1, 5])
        a = stub.Forward(ids, timeout=30).logits
        ids.model_id = "lm-copied"
        assert stub.Forward(ids, timeout=30).logits.data == a.data  # bit-identical
        err = rpc_error(lambda: stub.Load(load_request("lm-bad", "llama-a", load_mode="lazy"), timeout=30))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "load_mode 'lazy' is not one of mmap, copy" in err.details()
        assert "lm-bad" not in {m.id for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
    finally:
        for model_id in ("lm-mapped", "lm-copied"):
            stub.Unload(pb.UnloadRequest(model_id=model_id), timeout=30)
        copy_worker.stub().Unload(pb.UnloadRequest(model_id="lm-default"), timeout=30)


def test_info_reports_the_threads_a_serve_process_runs_with(tmp_path: Path) -> None:
    serve = ServeLog(["--port", "0", "--metrics-port", "0", "--model-root", str(tmp_path), "--threads", "1"])
    try:
        port = serve.listening_port()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            info = pb_grpc.ModelWorkerStub(channel).Info(pb.InfoRequest(), timeout=30)
        assert info.threads == 1
    finally:
        assert serve.stop() == 0


def test_info_reports_this_process_threads(worker: RunningServer) -> None:
    assert worker.stub().Info(pb.InfoRequest(), timeout=10).threads == torch.get_num_threads()
