"""Items 1, 5, 7 and 8: Load (in-process, over gRPC, the read floor, transformers), the worker's
resident memory, the gRPC overhead of a decode step and concurrent clients.

The worker runs as `python -m worker serve --port 0` in its own process, as in production: its
memory is measured from outside, and client threads in the bench never compete with the server for
the GIL.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

from registry.safetensors_loader import checkpoint_files, read_header
from worker.client import ForwardResult, KvCacheConfig, ModelInfo, ModelWorkerClient

from .common import (
    FRESH_PAGES_THRESHOLD,
    STEADY_THRESHOLD,
    Case,
    Goal,
    Row,
    Stats,
    alternate,
    paired_difference,
    proc_status,
    quantile,
    ratio,
    set_mmap_threshold,
)
from .context import Bench
from .models import DECODE_CONTEXT, LOAD_KV, BenchModel, load_ours, load_reference

MB = 1e6
LISTENING = re.compile(r"listening on (\S+):(\d+)")
CONCURRENT_CONTEXT = 256  # item 8: decode steps at this context
CLIENT_COUNTS = (1, 4, 16)


def kv_config(kv: Any) -> KvCacheConfig:
    return KvCacheConfig(
        block_size=kv.block_size,
        num_blocks=kv.num_blocks,
        max_seq_len=kv.max_seq_len,
        max_batch_size=kv.max_batch_size,
    )


class WorkerProcess:
    """`python -m worker serve` on a free loopback port, its log in a file; stopped with SIGTERM."""

    def __init__(
        self, roots: list[Path], threads: int, log_path: Path, env: dict[str, str] | None = None
    ) -> None:
        # Same intra-op threads as the bench process (torch reads OMP_NUM_THREADS at start).
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), **(env or {}))
        cmd = [sys.executable, "-m", "worker", "serve", "--port", "0", "--metrics-port", "0"]
        for root in roots:
            cmd += ["--model-root", str(root)]
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.port = 0
        self._client: ModelWorkerClient | None = None

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = LISTENING.search(self.log_path.read_text(errors="replace"))
            if match:
                self.port = int(match.group(2))
                self._client = ModelWorkerClient(self.target, timeout=600)
                self._client.health(timeout=30)  # connected and answering
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        tail = self.log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"the worker did not start (exit {self.proc.poll()}); its log ends:\n{tail}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def client(self) -> ModelWorkerClient:
        """The bench's client of this worker (item 8's clients open their own)."""
        assert self._client is not None, "wait_ready() first"
        return self._client

    def stop(self) -> None:
        """SIGTERM and wait (idempotent)."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


# -- item 7 ---------------------------------------------------------------------------------------------


class PeakSampler:
    """Samples a process's RSS every millisecond or so (a cross-check of the kernel's VmHWM)."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.001)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def memory(b: Bench, worker: WorkerProcess, model_id: str) -> None:
    """Item 7, on a worker that has loaded nothing yet: resident memory after a Load of SmolLM2 with
    the default KV cache, and the peak during it, against weights + KV bytes."""
    model = b.smol
    idle = proc_status(worker.pid)
    with PeakSampler(worker.pid) as sampler:
        info = worker.client.load(model_id, model.path).model
    after = proc_status(worker.pid)
    need = info.weight_bytes + info.kv_cache_bytes
    held = after["VmRSS"] - idle["VmRSS"]
    peak = max(after["VmHWM"], sampler.peak) - idle["VmRSS"]
    need_text = (
        f"{need / MB:.0f} MB = weights {info.weight_bytes / MB:.0f} + KV {info.kv_cache_bytes / MB:.0f}"
        f" ({info.load_mode}: {info.mapped_weight_bytes / MB:.0f} MB of the weights mapped from the file)"
    )
    b.report.add(
        Row(
            f"7. Worker RSS after Load − before, {model.label}",
            f"{held / MB:.0f} MB (idle worker {idle['VmRSS'] / MB:.0f} MB)",
            need_text,
            held / need,
            Goal(1.15),
            key="memory-after",
        )
    )
    b.report.add(
        Row(
            f"7. Worker peak RSS during Load − before, {model.label}",
            f"{peak / MB:.0f} MB",
            need_text,
            peak / need,
            Goal(1.3),
            key="memory-peak",
        )
    )


# -- item 1 ---------------------------------------------------------------------------------------------


def read_floor(files: list[Path]) -> list[torch.Tensor]:
    """Every tensor's bytes read into a fresh tensor of its own: the allocations and the bytes any
    loader must produce, with nothing else (no model, no checks beyond the header)."""
    out: list[torch.Tensor] = []
    for path in files:
        entries = sorted(read_header(path).values(), key=lambda e: e.offset)
        with path.open("rb", buffering=0) as f:
            for entry in entries:
                buf = torch.empty(entry.nbytes, dtype=torch.uint8)
                view = memoryview(buf.numpy())
                f.seek(entry.offset)
                done = 0
                while done < entry.nbytes:
                    n = f.readinto(view[done:])
                    if not n:
                        raise OSError(f"{path}: short read")
                    done += n
                out.append(buf)
    return out


def load(b: Bench, worker: WorkerProcess) -> None:
    """Item 1: Load of each model in-process and over gRPC against reading its bytes (the floor), and
    load-to-first-token against transformers. transformers' from_pretrained maps the file and reads
    weights lazily, so both sides are timed up to the logits of a first token, when every weight has
    been read.

    Every Load lands in fresh pages, as a worker's first Load does: this process sets glibc's mmap
    threshold for the item (the `worker` was started with it), so no candidate reuses pages that
    another one faulted in."""
    fresh = set_mmap_threshold(FRESH_PAGES_THRESHOLD)
    try:
        for model in b.models:
            _load(b, worker, model)
    finally:
        if fresh:
            set_mmap_threshold(STEADY_THRESHOLD)


def _load(b: Bench, worker: WorkerProcess, model: BenchModel) -> None:
    big = model is b.smol
    files = checkpoint_files(model.path)
    model_id = f"bench-load-{'smol' if big else 'tiny'}"
    one = torch.tensor([[1]])

    def ours() -> Any:
        return load_ours(b.registry, model_id, model, LOAD_KV)

    def ours_first() -> Any:
        m = ours()
        m.forward(one, all_logits=False)
        return m

    def unload(_: object) -> None:
        b.registry.unload_model(model_id)

    def ours_copy() -> Any:
        return load_ours(b.registry, model_id, model, LOAD_KV, load_mode="copy")

    def remote() -> Any:
        return worker.client.load(model_id, model.path, kv_cache=kv_config(LOAD_KV))

    def remote_unload(_: object) -> None:
        worker.client.unload(model_id)

    def reference_first() -> Any:
        hf = load_reference(model, "sdpa")
        with torch.inference_mode():
            hf(one, use_cache=False)
        return hf

    cases = [
        Case("floor", lambda: read_floor(files)),
        Case("ours", ours, cleanup=unload),
        Case("ours_copy", ours_copy, cleanup=unload),
        Case("grpc", remote, cleanup=remote_unload),
        Case("ours_first", ours_first, cleanup=unload),
        Case("ref_first", reference_first, collect=True),
        Case("ref_lazy", lambda: load_reference(model, "sdpa"), collect=True),
    ]
    stats = alternate(cases, b.budget(20.0 if big else 4.0), min_reps=3, max_reps=30)
    s = stats
    unit = "s" if big else "ms"
    floor_cell = f"{s['floor'].fmt(unit)} read {model.checkpoint_bytes / MB:.0f} MB"
    if big:
        b.report.add(
            Row(
                f"1. Load in-process vs reading the checkpoint, {model.label}",
                s["ours"].fmt(unit),
                floor_cell,
                ratio(s["ours"], s["floor"]),
                Goal(1.5),
                key="load-floor",
                spread=(s["ours"], s["floor"]),
            )
        )
        b.report.add(
            Row(
                f"1. Load over gRPC vs reading the checkpoint, {model.label}",
                s["grpc"].fmt(unit),
                floor_cell,
                ratio(s["grpc"], s["floor"]),
                Goal(1.5),
                key="load-grpc-floor",
                spread=(s["grpc"], s["floor"]),
            )
        )
    else:
        b.report.add(
            Row(
                f"1. Load over gRPC vs in-process, {model.label}",
                s["grpc"].fmt(unit),
                f"{s['ours'].fmt(unit)} in-process",
                ratio(s["grpc"], s["ours"]),
                None,
                note="fixed cost of a Load",
                key="load-grpc-tiny",
            )
        )
    b.report.add(
        Row(
            f"1. Load (mmap) vs transformers from_pretrained, {model.label}",
            s["ours"].fmt(unit),
            f"{s['ref_lazy'].fmt(unit)} (our --load-mode copy: {s['ours_copy'].fmt(unit)})",
            ratio(s["ours"], s["ref_lazy"]),
            Goal(1.0, strict=True),
            key=f"load-mmap-{model.label}",
            spread=(s["ours"], s["ref_lazy"]),
        )
    )
    b.report.add(
        Row(
            f"1. Load + first token vs transformers from_pretrained + first token, {model.label}",
            s["ours_first"].fmt(unit),
            f"{s['ref_first'].fmt(unit)} (from_pretrained alone, lazy: {s['ref_lazy'].fmt(unit)})",
            ratio(s["ours_first"], s["ref_first"]),
            Goal(1.0, strict=True),
            key=f"load-reference-{model.label}",
            spread=(s["ours_first"], s["ref_first"]),
        )
    )


# -- item 5 ---------------------------------------------------------------------------------------------


def load_remote(worker: WorkerProcess, model_id: str, model: BenchModel, kv: Any = None) -> ModelInfo:
    kv_cache = None if kv is None else kv_config(kv)
    return worker.client.load(model_id, model.path, kv_cache=kv_cache).model


def remote_prefill(client: ModelWorkerClient, model_id: str, ids: list[int]) -> None:
    client.forward(model_id, ids, use_cache=True, logits_mode="none")


def grpc_overhead(b: Bench, worker: WorkerProcess, remote_ids: dict[str, str]) -> None:
    """Item 5: a decode step at context 512 (Forward with use_cache) over gRPC against the same call
    made in-process, which is the worker's own model call: every reply carries its compute_seconds
    (`forward_with_cache`, timed inside the worker), so the added time is measured within each call.
    (Timing the in-process call in this process instead would put two processes' thread pools on the
    same cores in turn, and measure their interference.)"""
    modes = (
        ("LOGITS_LAST float32", "last", "float32"),
        ("LOGITS_LAST bfloat16", "last", "bfloat16"),
        ("LOGITS_NONE", "none", "float32"),
    )
    for model in b.models:
        _overhead(b, worker, model, remote_ids[model.label], modes)


def _overhead(
    b: Bench, worker: WorkerProcess, model: BenchModel, model_id: str, modes: tuple[tuple[str, str, str], ...]
) -> None:
    ctx = DECODE_CONTEXT
    ids = b.tokens(model, 1, ctx)
    client = worker.client
    remote_prefill(client, model_id, ids[0, : ctx - 1].tolist())
    token = [int(ids[0, ctx - 1])]
    compute: dict[str, list[float]] = {}

    def rpc(name: str, mode: str, dtype: str) -> Callable[[], Any]:
        seen = compute.setdefault(name, [])

        def call() -> ForwardResult:
            # Through the typed client, as a Python scheduler would call: the request is encoded
            # and the logits decoded (to numpy float32) inside the timed call.
            reply = client.forward(
                model_id,
                token,
                use_cache=True,
                start_pos=ctx - 1,
                logits_mode=mode,  # type: ignore[arg-type]
                logits_dtype=dtype,  # type: ignore[arg-type]
                timeout=60,
            )
            seen.append(reply.compute_seconds)
            return reply

        return call

    cases = [Case(name, rpc(name, mode, dtype)) for name, mode, dtype in modes]
    # The transport alone: a call that does no model work and no executor hop.
    cases.append(Case("health", lambda: client.health(timeout=60)))
    big = model is b.smol
    stats = alternate(cases, b.budget(8.0 if big else 3.0), min_reps=10, max_reps=400, warmup=3)
    unit = "ms" if big else "µs"
    reason = grpc_reason(statistics.median(compute[modes[0][0]]), b.ours[model.label].weight_bytes)
    for name, _, _ in modes:
        rpc_s = stats[name]
        model_call = Stats(tuple(compute[name][-len(rpc_s.samples) :]))  # the timed rounds' replies
        added = paired_difference(rpc_s, model_call)
        b.report.add(
            Row(
                f"5. gRPC overhead, decode step at context {ctx}, {name}, {model.label}",
                f"+{added.fmt(unit)} added (RPC {rpc_s.fmt(unit)})",
                f"{model_call.fmt(unit)} the model call in-process",
                ratio(rpc_s, model_call),
                Goal(1.0, text="≤ +1 ms at p50"),
                met=added.median <= 1e-3,
                note=f"a Health check {stats['health'].fmt(unit)}",
                key=f"grpc-{name}-{model.label}",
                spread=(added,),
            )
        )
        b.reasons[f"grpc-{name}-{model.label}"] = reason


_ECHO = "import os\nwhile os.read(0, 1) == b'x':\n    os.write(1, b'x')\n"


def wake_latency(idle_s: float, reps: int = 100) -> float:
    """Median round trip of one byte through a pipe to an echo process that slept for `idle_s`
    before each byte (this process spins meanwhile, as the model thread computes): what waking a
    thread that slept through a step costs on this machine."""
    proc = subprocess.Popen([sys.executable, "-c", _ECHO], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    out, back = proc.stdin.fileno(), proc.stdout.fileno()
    times = []
    try:
        for _ in range(reps):
            until = time.perf_counter() + idle_s
            while time.perf_counter() < until:
                pass
            start = time.perf_counter()
            os.write(out, b"x")
            os.read(back, 1)
            times.append(time.perf_counter() - start)
    finally:
        os.write(out, b"q")
        proc.wait(10)
    return sorted(times)[len(times) // 2]


def _reply_path_proxy() -> None:
    """A stand-in for the Python a reply runs through: build, serialize and parse a reply, and the
    13 turns of an event loop a Forward takes."""
    from worker.pb.modelworker.v1 import worker_pb2 as pb

    reply = pb.ForwardResponse(next_token_ids=[5], compute_seconds=0.03)
    reply.outputs.add().token_ids.append(5)
    pb.ForwardResponse.FromString(reply.SerializeToString())
    loop = asyncio.new_event_loop()

    async def turns() -> None:
        for _ in range(13):
            await asyncio.sleep(0)

    loop.run_until_complete(turns())
    loop.close()


def cold_cache_cost(nbytes: int, reps: int = 30) -> tuple[float, float]:
    """(hot, cold) medians of _reply_path_proxy, cold meaning right after reading `nbytes` (the
    model's weights, as a decode step does), which leaves nothing of it in the CPU caches."""
    sweep = torch.ones(max(1, nbytes // 4), dtype=torch.float32)
    hot, cold = [], []
    for _ in range(reps):
        start = time.perf_counter()
        _reply_path_proxy()
        hot.append(time.perf_counter() - start)
        sweep.sum()
        start = time.perf_counter()
        _reply_path_proxy()
        cold.append(time.perf_counter() - start)
    return statistics.median(hot), statistics.median(cold)


def grpc_reason(step_s: float, weight_bytes: int) -> str:
    """Item 5's reason, measured here: what the reply path's Python costs right after a step has
    streamed the weights through the caches, and what waking a thread that slept through it costs."""
    hot, cold = cold_cache_cost(weight_bytes)
    wake_hot, wake_cold = wake_latency(0.0), wake_latency(step_s)
    return (
        f"grpc.aio's own per-call work (a Health call: 16 event-loop callbacks, 11 turns of the loop) and one "
        f"hop to the model's thread and back (a Forward: 19 callbacks, 13 turns), run on both ends with caches "
        f"the step emptied: measured here, a stand-in for that Python (a reply built, serialized, parsed; 13 "
        f"loop turns) takes {cold * 1e6:.0f} µs right after reading the {weight_bytes / 1e6:.0f} MB of weights "
        f"against {hot * 1e6:.0f} µs hot; and the threads that slept through the step wake slower (a pipe "
        f"round trip to a process idle for {step_s * 1e3:.0f} ms: {wake_cold * 1e6:.0f} µs, hot "
        f"{wake_hot * 1e6:.0f} µs)"
    )


# -- item 8 ---------------------------------------------------------------------------------------------


@dataclass
class ClientLog:
    latencies: list[float] = field(default_factory=list)
    compute: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class DecodeCall:
    """One client's repeated decode step: token at start_pos of model_id's contiguous cache row."""

    model_id: str
    token: int
    start_pos: int

    def send(self, client: ModelWorkerClient) -> ForwardResult:
        return client.forward(
            self.model_id, [self.token], use_cache=True, start_pos=self.start_pos, timeout=120
        )


def _client_loop(
    target: str,
    call: DecodeCall,
    ready: threading.Barrier,
    go: threading.Event,
    deadline: list[float],
    log: ClientLog,
) -> None:
    with ModelWorkerClient(target) as client:  # a connection of its own, like a separate scheduler
        call.send(client)  # connect and warm up, untimed
        ready.wait()
        go.wait()
        while time.perf_counter() < deadline[0]:
            began = time.perf_counter()
            reply = call.send(client)
            log.latencies.append(time.perf_counter() - began)
            log.compute.append(reply.compute_seconds)


def run_clients(
    worker: WorkerProcess, requests: list[DecodeCall], seconds: float
) -> tuple[float, Stats, float]:
    """Each request in a client thread (and channel) of its own, all starting together once every one
    is connected, for `seconds`: (calls/s, latencies, forwards in flight on average = Σ server
    compute time ÷ wall time)."""
    logs = [ClientLog() for _ in requests]
    ready = threading.Barrier(len(requests) + 1)
    go = threading.Event()
    deadline = [0.0]
    threads = [
        threading.Thread(target=_client_loop, args=(worker.target, r, ready, go, deadline, log), daemon=True)
        for r, log in zip(requests, logs, strict=True)
    ]
    for t in threads:
        t.start()
    ready.wait(timeout=300)
    began = time.perf_counter()
    deadline[0] = began + seconds
    go.set()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    latencies = [x for log in logs for x in log.latencies]
    compute = sum(x for log in logs for x in log.compute)
    return len(latencies) / wall, Stats(tuple(latencies)), compute / wall


def concurrency(b: Bench, worker: WorkerProcess, model_ids: list[str]) -> None:
    """Item 8: 1, 4 and 16 clients issuing decode-step Forwards (context 256, LOGITS_LAST float32)
    against one model, then spread over two models. The per-model lock serializes one model's calls;
    two models must overlap (forwards in flight > 1)."""
    ctx = CONCURRENT_CONTEXT
    model = b.smol
    ids = b.tokens(model, ctx)
    for model_id in model_ids:
        remote_prefill(worker.client, model_id, ids[: ctx - 1].tolist())
    requests = {model_id: DecodeCall(model_id, int(ids[-1]), ctx - 1) for model_id in model_ids}
    seconds = 1.5 if b.quick else 4.0
    one: dict[int, tuple[float, Stats, float]] = {}
    for clients in CLIENT_COUNTS:
        for n_models in (1, 2):
            chosen = [requests[model_ids[i % n_models]] for i in range(clients)]
            rate, lat, in_flight = run_clients(worker, chosen, seconds)
            cell = (
                f"{rate:.1f} calls/s, p50 {quantile(lat.samples, 0.5) * 1e3:.0f} ms, "
                f"p99 {quantile(lat.samples, 0.99) * 1e3:.0f} ms, in flight {in_flight:.2f}"
            )
            if n_models == 1:
                one[clients] = (rate, lat, in_flight)
                b.report.add(
                    Row(
                        f"8. {clients} client{'s' if clients > 1 else ''}, 1 model, decode step at context {ctx}",
                        cell,
                        f"{one[1][0]:.1f} calls/s with 1 client" if clients > 1 else "—",
                        rate / one[1][0] if clients > 1 else None,
                        None,
                        key=f"concurrent-1-{clients}",
                    )
                )
            else:
                base = one[clients][0]
                goal = "in flight > 1" if clients > 1 else None
                b.report.add(
                    Row(
                        f"8. {clients} client{'s' if clients > 1 else ''}, 2 models, decode step at context {ctx}",
                        cell,
                        f"{base:.1f} calls/s with 1 model",
                        rate / base,
                        goal,
                        met=(in_flight > 1.0) if clients > 1 else None,
                        key=f"concurrent-2-{clients}",
                    )
                )
