"""A `modelworker serve` subprocess on a loopback port, with its JSON log lines collected as they come
and its resources (resident memory, open file descriptors, threads) read through psutil."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.worker import slow_arch
from worker.pb.modelworker.v1 import worker_pb2 as pb
from worker.pb.modelworker.v1 import worker_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024


def plugin_env_for(site: Path) -> dict[str, str]:
    """A clean environment (no MODELWORKER_* settings leaking in) whose PYTHONPATH holds a dist-info
    with an entry point for the slow test architecture."""
    dist = site / "modelworker_reliability_slow-0.1.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: modelworker-reliability-slow\nVersion: 0.1\n"
    )
    (dist / "entry_points.txt").write_text(
        f"[modelworker.architectures]\nslow = {slow_arch.__name__}:register\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELWORKER_")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO)])
    return env


class ServeProcess:
    """`python -m worker serve --port 0 --metrics-port 0 --model-root ROOT ARGS...`."""

    def __init__(self, root: Path, env: dict[str, str], *args: str, start_timeout: float = 60) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "serve", "--log-format", "json", "--port", "0",
             "--metrics-port", "0", "--model-root", str(root), *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._new = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        try:
            line = self.wait_for(lambda r: r["msg"].startswith("listening on "), start_timeout)
            self.port = int(line["msg"].rsplit(":", 1)[1])
            self.ps = psutil.Process(self.proc.pid)
            self.channel = grpc.insecure_channel(
                f"127.0.0.1:{self.port}", options=[("grpc.max_receive_message_length", 300 * MiB)]
            )
            self.stub = pb_grpc.ModelWorkerStub(self.channel)
            self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        except BaseException:
            self.kill()
            raise

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._new:
                self.raw.append(line)
                try:
                    self.lines.append(json.loads(line))
                except ValueError:
                    pass
                self._new.notify_all()

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._new:
            while True:
                found = next((line for line in self.lines if predicate(line)), None)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError("log line not seen; worker stderr:\n" + "".join(self.raw[-40:]))
                self._new.wait(min(left, 0.2))

    # -- resources of the worker process ---------------------------------------------------------
    def rss(self) -> int:
        return self.ps.memory_info().rss

    def vms(self) -> int:
        return self.ps.memory_info().vms

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def threads(self) -> int:
        return self.ps.num_threads()

    def settled_rss(self, samples: int = 3, pause: float = 0.05) -> int:
        """The lowest of a few readings: a reading taken while the allocator is returning pages is
        higher than where the process settles."""
        readings = []
        for _ in range(samples):
            readings.append(self.rss())
            time.sleep(pause)
        return min(readings)

    # -- calls -----------------------------------------------------------------------------------
    def health(self, service: str = "") -> int:
        return self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    def model_ids(self) -> list[str]:
        return sorted(m.id for m in self.stub.ListModels(pb.ListModelsRequest(), timeout=10).models)

    # -- ending ----------------------------------------------------------------------------------
    def terminate(self) -> float:
        """SIGTERM; returns the monotonic time it was sent."""
        sent = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        return sent

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        channel = getattr(self, "channel", None)
        if channel is not None:
            channel.close()

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
