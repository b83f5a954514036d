"""A `modelworker serve` subprocess on a loopback port, with its JSON log lines collected as they come
and its resources (resident memory, open file descriptors, threads) read through psutil."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.serve_process import ServeLog
from worker.pb.modelworker.v1 import worker_pb2 as pb
from worker.pb.modelworker.v1 import worker_pb2_grpc as pb_grpc

MiB = 1024 * 1024


class ServeProcess(ServeLog):
    """`python -m worker serve --port 0 --metrics-port 0 --model-root ROOT ARGS...`, listening, with a
    channel to it and its resources (resident memory, open file descriptors, threads) through psutil."""

    wait_timeout = 30.0

    def __init__(self, root: Path, env: dict[str, str], *args: str, start_timeout: float = 60) -> None:
        super().__init__(["--port", "0", "--metrics-port", "0", "--model-root", str(root), *args], env)
        try:
            self.port = self.listening_port(start_timeout)
            self.ps = psutil.Process(self.proc.pid)
            self.channel = grpc.insecure_channel(
                f"127.0.0.1:{self.port}", options=[("grpc.max_receive_message_length", 300 * MiB)]
            )
            self.stub = pb_grpc.ModelWorkerStub(self.channel)
            self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        except BaseException:
            self.kill()
            raise

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
        super().kill()
        channel = getattr(self, "channel", None)
        if channel is not None:
            channel.close()

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
