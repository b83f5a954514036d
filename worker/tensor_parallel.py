"""Tensor parallelism across processes: rank 0 serves gRPC, followers mirror its model calls.

`modelworker serve --tensor-parallel-size N` starts the other ranks of this node itself (spawned
processes; one GPU each on CUDA, `cores / ranks` torch threads each on CPU) and joins them in a
torch.distributed group: NCCL (CUDA) or gloo (CPU) for the model's collectives, plus a gloo group
for the control channel. Each model call on rank 0 goes through `TensorParallelModel`, which first
broadcasts (model key, method, arguments) on the control group; every follower runs the same call on
its shard, so the collectives inside the forward pass line up. Results come from rank 0 (logits are
gathered to every rank by the vocab-parallel head). One lock orders all calls: collectives of two
models must not interleave.

Faults: a monitor thread watches the local followers (and a heartbeat broadcast checks remote ones
when idle); a lost rank turns health NOT_SERVING, calls get UNAVAILABLE, the remaining followers are
ended and the worker exits with status 1 so the orchestrator restarts the group. Followers die with
rank 0 (PR_SET_PDEATHSIG, and a control-channel timeout for other hosts): no orphans.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import pickle
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from registry import Model, ModelNotReady, ModelRegistry
from registry.config import ModelConfig, read_config_json
from registry.errors import FailedPrecondition, InvalidArgument, InvalidConfig
from registry.load_plan import LoadPlan, make_load_plan
from registry.parallel import ParallelContext
from registry.registry import _takes_plan
from registry.safetensors_loader import index_checkpoint
from registry.weight_update import apply_staged_slices, check_update, read_staged_slices, update_target

from .logs import LOGGER_NAME, fields
from .settings import Settings, effective_threads

log = logging.getLogger(LOGGER_NAME)

HEARTBEAT_SECONDS = 1.0  # idle control-channel pings (followers on other hosts notice a lost rank 0)
MONITOR_SECONDS = 0.2  # how often rank 0 checks its local followers
FAILURE_GRACE_SECONDS = 1.5  # in-flight calls get their UNAVAILABLE before the process exits
CONTROL_TIMEOUT = timedelta(seconds=30)  # a follower waiting this long for a command: rank 0 is gone
MODEL_TIMEOUT = timedelta(seconds=600)  # one collective (a Load on a slow disk included)
MODEL_METHODS = (
    "forward",
    "forward_with_cache",
    "forward_paged",
    "reset_kv_cache",
    "slice_kv_cache",
    "export_kv_blocks",
    "import_kv_blocks",
)


class RankLost(ModelNotReady):
    """A tensor-parallel rank died: the group cannot serve (UNAVAILABLE); the worker exits."""


# Errors every rank raises alike from its own checks, before any collective: the ranks stay in step.
# Any other failure of a model call (out of memory mid-forward, a bug) may leave ranks inside
# different collectives, so it ends the group (UNAVAILABLE, exit 1) rather than risk a hang.
SAME_ON_EVERY_RANK = (InvalidArgument, FailedPrecondition)


def ranks_per_node(settings: Settings) -> int:
    return settings.tensor_parallel_size // settings.nnodes


def threads_per_rank(settings: Settings) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // ranks_per_node(settings))


def intra_op_threads(settings: Settings) -> int:
    """Torch intra-op threads of this process's model work: --threads (worker/settings.py), or on
    CPU under tensor parallelism the cores split among this host's ranks."""
    if settings.tensor_parallel_size > 1 and not _uses_cuda(settings):
        return threads_per_rank(settings)
    return effective_threads(settings.threads)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the process that started it dies (no orphans)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _uses_cuda(settings: Settings) -> bool:
    return settings.device.startswith("cuda") or (settings.device == "auto" and torch.cuda.is_available())


def _init_process_groups(settings: Settings, rank: int, port: int) -> tuple[ParallelContext, Any]:
    """Join the world: (the model's ParallelContext on the default group, the control group)."""
    import torch.distributed as dist

    cuda = _uses_cuda(settings)
    if cuda:
        torch.cuda.set_device(rank % ranks_per_node(settings))
    else:
        torch.set_num_threads(threads_per_rank(settings))
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"tcp://{settings.master_addr}:{port}",
        rank=rank,
        world_size=settings.tensor_parallel_size,
        timeout=MODEL_TIMEOUT,
    )
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return ParallelContext(rank, settings.tensor_parallel_size, None), control


def _rank_device(plan_device: torch.device, rank: int, per_node: int) -> torch.device:
    return torch.device("cuda", rank % per_node) if plan_device.type == "cuda" else plan_device


def _portable_error(exc: BaseException) -> BaseException:
    """`exc` if it crosses ranks intact (pickled and back, same type and message); else the nearest
    base class that carries its message (WeightsMismatch → InvalidArgument: same status code), else
    an InvalidConfig with its text."""

    def intact(e: BaseException) -> bool:
        try:
            copy = pickle.loads(pickle.dumps(e))
        except Exception:
            return False
        return type(copy) is type(e) and str(copy) == str(e)

    if intact(exc):
        return exc
    text = str(exc)
    for base in type(exc).__mro__[1:]:
        if issubclass(base, Exception) and base is not Exception:
            try:
                candidate = base(text)
            except Exception:
                continue
            if intact(candidate):
                return candidate
    return InvalidConfig(f"{type(exc).__name__}: {exc}")


# -- rank 0 ------------------------------------------------------------------------------------


class TensorParallelGroup:
    """Rank 0's end: the followers it started, the control channel and the fault monitor."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.world_size = settings.tensor_parallel_size
        self.lock = threading.Lock()  # one call at a time over all ranks
        self.failed: str | None = None
        self._on_failure: list[Callable[[], None]] = []
        self._stopping = False
        port = settings.master_port or _free_port()
        import torch.multiprocessing as mp

        spawn = mp.get_context("spawn")
        self.followers = [
            spawn.Process(
                target=follower_main,
                args=(settings, rank, port, os.getpid()),
                name=f"modelworker-rank{rank}",
                daemon=False,
            )
            for rank in range(1, ranks_per_node(settings))
        ]
        for process in self.followers:
            process.start()
        log.info(
            "tensor parallel: started %d follower rank(s)",
            len(self.followers),
            extra=fields(world_size=self.world_size, pids=[p.pid for p in self.followers]),
        )
        try:
            self.parallel, self.control = _init_process_groups(settings, 0, port)
        except BaseException:
            self._end_followers()
            raise
        threading.Thread(target=self._monitor, name="tp-monitor", daemon=True).start()

    # -- the control channel -------------------------------------------------------------------
    def _broadcast(self, command: tuple) -> None:
        import torch.distributed as dist

        dist.broadcast_object_list([command], src=0, group=self.control)

    def run(self, command: tuple, local: Callable[[], Any], *, agreed: bool = False) -> Any:
        """Broadcast `command`, run `local` (this rank's part of it); a lost rank is UNAVAILABLE.
        `agreed`: `local` ends with every rank agreeing on the outcome (a build), so any error it
        raises leaves the ranks in step."""
        with self.lock:
            self._check_alive()
            try:
                self._broadcast(command)
                return local()
            except SAME_ON_EVERY_RANK:
                raise
            except Exception as exc:
                if agreed and not self.failed and not _is_distributed_error(exc):
                    raise
                self._fail(f"{command[0]} {command[2] if len(command) > 2 else ''} failed on rank 0: {exc}")
                raise RankLost(self._failure_message()) from None

    def _check_alive(self) -> None:
        if self.failed:
            raise RankLost(self._failure_message())

    def _failure_message(self) -> str:
        return f"a tensor-parallel rank was lost ({self.failed}); the worker is exiting to be restarted"

    # -- building ------------------------------------------------------------------------------
    def wrap_registry(self, registry: ModelRegistry) -> None:
        """Make every architecture's builder build this rank's shard and the followers' shards."""
        registry.parallel = self.parallel  # admission sees this rank's share of the weights
        for name in registry.list_architectures():
            builder = registry.get_builder(name)
            if builder is not None:
                registry.register_architecture(name, self._sharded_builder(name, builder))

    def _sharded_builder(self, name: str, builder: Callable[..., Model]) -> Callable[..., Model]:
        takes_plan = _takes_plan(builder)

        def build(model_dir: Path, device: torch.device, options: Any, *, plan: LoadPlan) -> Model:
            if not takes_plan:
                raise InvalidConfig(f"{name} does not support tensor parallelism (its builder takes no plan)")
            key = uuid.uuid4().hex
            command = ("build", key, name, str(model_dir), options, plan.dtype, plan.cache)

            def local() -> Model:
                here = dataclasses.replace(plan, parallel=self.parallel)
                return _build_and_agree(builder, here, self.parallel)

            model = self.run(command, local, agreed=True)
            return TensorParallelModel(model, key, self)

        return build

    def local_ranks(self) -> list[tuple[int, int]]:
        """(rank, pid) of every rank on this host, rank 0 (this process) first."""
        return [(0, os.getpid())] + [(r, p.pid) for r, p in enumerate(self.followers, start=1) if p.pid]

    # -- faults --------------------------------------------------------------------------------
    def on_failure(self, callback: Callable[[], None]) -> None:
        self._on_failure.append(callback)

    def _monitor(self) -> None:
        last_ping = time.monotonic()
        while not self._stopping and not self.failed:
            dead = [p for p in self.followers if not p.is_alive()]
            if dead:
                codes = ", ".join(f"{p.name} exit code {p.exitcode}" for p in dead)
                self._fail(f"{codes}")
                return
            if time.monotonic() - last_ping >= HEARTBEAT_SECONDS and self.lock.acquire(blocking=False):
                try:
                    if not self._stopping:
                        self._broadcast(("ping",))
                except Exception as exc:
                    self._fail(f"heartbeat failed: {exc}")
                    return
                finally:
                    self.lock.release()
                last_ping = time.monotonic()
            time.sleep(MONITOR_SECONDS)

    def _fail(self, why: str) -> None:
        if self.failed or self._stopping:
            return
        self.failed = why
        log.error("tensor parallel: rank lost, exiting", extra=fields(reason=why))
        for callback in self._on_failure:
            try:
                callback()
            except Exception:
                log.exception("failure callback raised")
        threading.Thread(target=self._exit_after_grace, name="tp-exit", daemon=True).start()

    def _exit_after_grace(self) -> None:
        time.sleep(FAILURE_GRACE_SECONDS)
        self._end_followers()
        logging.shutdown()
        os._exit(1)

    def _end_followers(self) -> None:
        for p in self.followers:
            if p.is_alive():
                p.kill()
        for p in self.followers:
            p.join(5)

    def shutdown(self) -> None:
        """Stop every rank (after the models were unloaded): an exit command, then a kill for any
        follower that does not go within 10 s."""
        if self._stopping:
            return
        with self.lock:
            self._stopping = True
            if not self.failed:
                try:
                    self._broadcast(("exit",))
                except Exception:
                    pass
        for p in self.followers:
            p.join(10)
        self._end_followers()
        try:
            import torch.distributed as dist

            dist.destroy_process_group()
        except Exception:
            pass


def _is_distributed_error(exc: BaseException) -> bool:
    import torch.distributed as dist

    return isinstance(exc, getattr(dist, "DistError", RuntimeError)) or "gloo" in str(exc).lower()


def _build_and_agree(builder: Callable[..., Model], plan: LoadPlan, parallel: ParallelContext) -> Model:
    """Build this rank's shard; all ranks then exchange outcomes, and if any failed every rank drops
    its shard and the first error is raised (on rank 0, to the caller)."""
    model: Model | None = None
    error: BaseException | None = None
    try:
        model = builder(plan.model_dir, plan.device, plan.options, plan=plan)
    except Exception as exc:
        error = _portable_error(exc)
    errors = parallel.all_gather_object(error)
    failed = next((e for e in errors if e is not None), None)
    if failed is not None:
        if model is not None:
            model.release()
        raise failed
    assert model is not None
    return model


def _update_and_agree(model: Model, parallel: ParallelContext, path: Path) -> tuple[int, int]:
    """Stage this rank's slices of the checkpoint in `path` (checked as strictly as a Load); all
    ranks then exchange outcomes, and only if every rank staged its part does any rank copy them in,
    so the shards never mix old and new weights. Returns (tensors, checkpoint bytes)."""
    staged, error = None, None
    try:
        target = update_target(model)
        plan = check_update(target, index_checkpoint(path).values(), where=str(path))
        staged = read_staged_slices(target, plan)
    except Exception as exc:
        error = _portable_error(exc)
    failed = next((e for e in parallel.all_gather_object(error) if e is not None), None)
    if failed is not None:
        raise failed
    assert staged is not None
    apply_staged_slices(staged)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    return len(plan), sum(entry.nbytes for entry, _ in plan)


class TensorParallelModel(Model):
    """Rank 0's handle on a sharded model: each call is broadcast to the followers first."""

    def __init__(self, local: Model, key: str, group: TensorParallelGroup) -> None:
        self.local = local
        self.key = key
        self.group = group
        self.config = local.config

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        command = ("call", self.key, method, args, kwargs)
        return self.group.run(command, lambda: getattr(self.local, method)(*args, **kwargs))

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._call("forward", *args, **kwargs)

    def forward_with_cache(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._call("forward_with_cache", *args, **kwargs)

    def forward_paged(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._call("forward_paged", *args, **kwargs)

    def reset_kv_cache(self) -> None:
        return self._call("reset_kv_cache")

    def slice_kv_cache(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self._call("slice_kv_cache", *args, **kwargs)

    @property
    def kv_layout(self):  # noqa: ANN201 - KvLayout (every rank's heads)
        return self.local.kv_layout

    def export_kv_blocks(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self._call("export_kv_blocks", *args, **kwargs)

    def import_kv_blocks(self, *args: Any, **kwargs: Any) -> None:
        return self._call("import_kv_blocks", *args, **kwargs)

    def update_weights_from_dir(self, path: Path) -> tuple[int, int]:
        """UpdateWeights from a checkpoint directory on every rank, each reading its own slices; all
        or nothing (see `_update_and_agree`). Returns (tensors, checkpoint bytes)."""
        command = ("update", self.key, str(path))
        local = lambda: _update_and_agree(self.local, self.group.parallel, path)  # noqa: E731
        return self.group.run(command, local, agreed=True)

    def release(self) -> int:
        if self.group.failed or self.group._stopping:
            return self.local.release()
        return self.group.run(("release", self.key), self.local.release)

    # -- metadata (rank 0's shard) ------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.local.device

    @property
    def dtype(self) -> torch.dtype:
        return self.local.dtype

    @property
    def num_parameters(self) -> int:
        return self.local.num_parameters

    @property
    def weight_bytes(self) -> int:
        return self.local.weight_bytes

    @property
    def cache_spec(self):  # noqa: ANN201 - CacheSpec
        return self.local.cache_spec

    @property
    def attention_backend(self) -> str:
        return self.local.attention_backend

    @property
    def tensor_parallel_size(self) -> int:
        return self.group.world_size

    @property
    def load_mode(self) -> str:
        return self.local.load_mode

    @property
    def cpu_gemm(self) -> str:
        return self.local.cpu_gemm

    @property
    def mapped_weight_bytes(self) -> int:
        return self.local.mapped_weight_bytes

    @property
    def quantization(self) -> str:
        return self.local.quantization

    def __getattr__(self, name: str) -> Any:
        """Metadata of the local shard (cuda_graph_bytes, ...). A method not routed above would run on
        rank 0 alone and wait forever in its collectives: it is absent instead."""
        value = getattr(self.__dict__["local"], name)
        if callable(value):
            raise AttributeError(f"{name} is not available under tensor parallelism")
        return value


class RankMemoryCollector:
    """`modelworker_rank_resident_bytes{rank}`: each local rank's resident memory (VmRSS), read when
    scraped (on CUDA, each rank's GPU is `modelworker_device_memory_bytes{device="cuda:<rank>"}`)."""

    NAME = "modelworker_rank_resident_bytes"
    HELP = "Resident memory of each tensor-parallel rank on this host (its process's VmRSS)."

    def __init__(self, ranks: Callable[[], list[tuple[int, int]]]) -> None:
        self._ranks = ranks  # () → [(rank, pid)]

    def describe(self) -> list[Any]:
        from prometheus_client.core import GaugeMetricFamily

        return [GaugeMetricFamily(self.NAME, self.HELP, labels=["rank"])]

    def collect(self) -> list[Any]:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(self.NAME, self.HELP, labels=["rank"])
        for rank, pid in self._ranks():
            rss = _resident_bytes(pid)
            if rss is not None:
                family.add_metric([str(rank)], rss)
        return [family]


def _resident_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# -- followers ---------------------------------------------------------------------------------


def follower_main(settings: Settings, rank: int, port: int, parent_pid: int) -> None:
    """A follower rank: join the group, then run rank 0's commands until told to exit."""
    _die_with_parent()
    # A signal sent to the whole process group (Ctrl-C, `timeout`, systemd) is for rank 0, which
    # unloads and then stops the followers; a follower never outlives it (PR_SET_PDEATHSIG).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if os.getppid() != parent_pid:
        os._exit(1)
    from .logs import configure_logging
    from .server import build_registry

    configure_logging(settings.log_level, settings.log_format)
    try:
        parallel, control = _init_process_groups(settings, rank, port)
    except Exception as exc:
        log.error("rank %d could not join the group: %s", rank, exc)
        os._exit(1)
    registry = build_registry(settings)
    code = _follow(registry, settings, parallel, control)
    logging.shutdown()
    os._exit(code)


def _follow(registry: ModelRegistry, settings: Settings, parallel: ParallelContext, control: Any) -> int:
    import torch.distributed as dist

    models: dict[str, Model] = {}
    per_node = ranks_per_node(settings)
    while True:
        box: list[Any] = [None]
        try:
            dist.broadcast_object_list(box, src=0, group=control)
        except Exception as exc:
            log.error("rank %d lost rank 0: %s", parallel.rank, exc)
            return 1
        command = box[0]
        kind = command[0]
        if kind == "ping":
            continue
        if kind == "exit":
            for model in models.values():
                model.release()
            return 0
        try:
            with torch.inference_mode():
                if kind == "build":
                    _, key, arch, model_dir, options, dtype, cache = command
                    models[key] = _follower_build(
                        registry, parallel, per_node, arch, model_dir, options, dtype, cache
                    )
                elif kind == "call":
                    _, key, method, args, kwargs = command
                    if method in MODEL_METHODS:
                        getattr(models[key], method)(*args, **kwargs)
                elif kind == "update":
                    _, key, path = command
                    _update_and_agree(models[key], parallel, Path(path))
                elif kind == "release":
                    model = models.pop(command[1], None)
                    if model is not None:
                        model.release()
        except SAME_ON_EVERY_RANK:
            pass  # rank 0 raised the same error from the same checks and answers the call
        except Exception as exc:
            if kind in ("build", "update") and not _is_distributed_error(exc):
                continue  # every rank agreed on the failed build or update
            log.error("rank %d: %s failed, leaving the group: %s", parallel.rank, kind, exc)
            return 1


def _follower_build(
    registry: ModelRegistry,
    parallel: ParallelContext,
    per_node: int,
    arch: str,
    model_dir: str,
    options: Any,
    dtype: torch.dtype,
    cache: Any,
) -> Model:
    """This rank's shard, from the same plan as rank 0's (cache sizes and dtype as rank 0 decided)."""
    path = Path(model_dir)
    builder = registry.get_builder(arch)
    try:
        if builder is None:
            raise InvalidConfig(f"architecture {arch} is not registered on rank {parallel.rank}")
        config = ModelConfig.from_hf(read_config_json(path / "config.json"), arch)
        device = torch.device(options.device) if options.device else registry.device
        device = _rank_device(device, parallel.rank, per_node)
        plan = make_load_plan(
            path, arch, config, options, device, registry.attention_backends, parallel=parallel
        )
        plan = dataclasses.replace(plan, dtype=dtype, cache=cache)
    except Exception as exc:
        parallel.all_gather_object(_portable_error(exc))  # the agreement rank 0 waits for
        raise
    return _build_and_agree(builder, plan, parallel)


def serve_followers(settings: Settings) -> int:
    """`modelworker serve --node-rank K` (K > 0): this node's ranks only, no gRPC; exits when they do
    (non-zero if any failed)."""
    import torch.multiprocessing as mp

    per_node = ranks_per_node(settings)
    spawn = mp.get_context("spawn")
    first = settings.node_rank * per_node
    processes = [
        spawn.Process(target=follower_main, args=(settings, rank, settings.master_port, os.getpid()))
        for rank in range(first, first + per_node)
    ]
    for p in processes:
        p.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.is_set() and all(p.is_alive() for p in processes):
        stop.wait(MONITOR_SECONDS)
    for p in processes:
        if p.is_alive():
            p.kill()
        p.join(5)
    return 0 if all(p.exitcode == 0 for p in processes) else 1


__all__ = ["RankLost", "TensorParallelGroup", "TensorParallelModel", "serve_followers"]
