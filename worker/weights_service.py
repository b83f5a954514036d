"""The servicer's weight-update and memory-release RPCs (DESIGN.md "Weight updates and memory release").

Tensors are gathered and checked without the model's lock (forwards keep running on the old
weights); only the final copy into the parameters takes the lock, so a forward sees all-old or
all-new weights, never a mix. ReleaseMemory / ResumeMemory run under the lock too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch

from registry import memory
from registry.errors import (
    FailedPrecondition,
    InvalidArgument,
    ModelAlreadyExists,
    ModelNotReady,
    ModelSleeping,
    NotFound,
    WeightsMismatch,
)
from registry.registry import ModelState, validate_model_id
from registry.safetensors_loader import index_checkpoint, load_weights
from registry.weight_update import (
    TensorAssembler,
    TensorChecker,
    UpdatePlan,
    UpdateTarget,
    apply_update,
    check_update,
    read_staged,
    tensor_spec,
    update_target,
)

from . import devices as dev
from .compute_threads import single_threaded_executor
from .pb.modelworker.v1 import worker_pb2 as pb
from .status import note, rpc_method
from .weights_group import BACKENDS, GROUP_NAME, WeightsGroup

# Every wire DType a checkpoint tensor may travel in.
WIRE_DTYPES: dict[int, torch.dtype] = {
    pb.FLOAT32: torch.float32,
    pb.FLOAT16: torch.float16,
    pb.BFLOAT16: torch.bfloat16,
    pb.INT32: torch.int32,
    pb.INT64: torch.int64,
    pb.INT8: torch.int8,
    pb.UINT8: torch.uint8,
    pb.FLOAT8_E4M3FN: torch.float8_e4m3fn,
    pb.INT16: torch.int16,
}
DEFAULT_GROUP_TIMEOUT = 60.0


def wire_dtype(value: int, where: str) -> torch.dtype:
    if value not in WIRE_DTYPES:
        raise InvalidArgument(f"{where}: dtype {value} is not a DType this worker reads")
    return WIRE_DTYPES[value]


@dataclass
class _Group:
    group: WeightsGroup
    thread: ThreadPoolExecutor  # every collective of the group, in order, off the event loop
    device: torch.device
    busy: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(frozen=True)
class _Staged:
    model: object  # the model the tensors were checked against
    target: UpdateTarget
    plan: UpdatePlan
    tensors: dict[str, torch.Tensor]


class WeightsServicerMixin:
    """Mixed into ModelWorkerServicer (uses its registry, observer and locking helpers)."""

    # -- shared steps ----------------------------------------------------------------------------
    def _weights_groups(self) -> dict[str, _Group]:
        groups = getattr(self, "_groups", None)
        if groups is None:
            groups = self._groups = {}
        return groups

    def _resident_model(self, model_id: str, *, refuse_quantized: bool = True) -> object:
        """The model whose weights an update may replace (not loading, weights not released, and
        unless refuse_quantized is False, not quantized)."""
        entry = self.registry.get_entry(model_id)
        model = entry.model
        if model is None or entry.state not in (ModelState.READY, ModelState.SLEEPING):
            raise ModelNotReady(f"model {model_id!r} is {entry.state.value.lower()}")
        if entry.released is not None and memory.WEIGHTS in entry.released.tags:
            raise ModelSleeping(
                f"model {model_id!r} has released its weights; ResumeMemory(tags=['weights']) before updating them"
            )
        if refuse_quantized:
            _refuse_quantized(model, model_id)
        return model

    async def _apply_staged(
        self, model_id: str, staged: _Staged, source: str, weights_source: Path | None, started: float
    ) -> pb.UpdateWeightsResponse:
        def apply() -> tuple[int, int]:
            with self.registry.get_model_mut(model_id, allow_sleeping=True) as current:
                entry = self.registry.get_entry(model_id)
                if current is not staged.model:
                    raise FailedPrecondition(
                        f"model {model_id!r} was unloaded and loaded again while the update arrived; send it again"
                    )
                if entry.released is not None and memory.WEIGHTS in entry.released.tags:
                    raise ModelSleeping(f"model {model_id!r} released its weights while the update arrived")
                nbytes = apply_update(staged.target, staged.plan, staged.tensors)
                if current.device.type == "cuda":
                    torch.cuda.synchronize(current.device)
                entry.weights_version += 1
                entry.weights_source = weights_source
                return entry.weights_version, nbytes

        version, nbytes = await self._locked(model_id, apply)
        seconds = time.perf_counter() - started
        note(weights_version=version, source=source, bytes=nbytes)
        self.observer.weights_updated(model_id, source, seconds)
        return pb.UpdateWeightsResponse(
            weights_version=version, update_seconds=seconds, num_tensors=len(staged.plan), bytes=nbytes
        )

    # -- UpdateWeights (checkpoint directory) ----------------------------------------------------
    @rpc_method("UpdateWeights")
    async def UpdateWeights(
        self, request: pb.UpdateWeightsRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateWeightsResponse:
        model_id = validate_model_id(request.model_id)
        if not request.model_dir:
            raise InvalidArgument("model_dir is empty")
        started = time.perf_counter()
        self._resident_model(model_id)

        def stage() -> tuple[_Staged, Path]:
            # Resolve first: PERMISSION_DENIED / NOT_FOUND before anything inside is read.
            path = self.registry.resolve_dir(request.model_dir)
            model = self._resident_model(model_id)
            target = update_target(model)
            plan = check_update(target, index_checkpoint(path).values(), where=str(path))
            return _Staged(model, target, plan, read_staged(plan)), path

        if _sharded(self._resident_model(model_id)):
            path = await self._in_thread(lambda: self.registry.resolve_dir(request.model_dir))
            return await self._apply_sharded(model_id, path, started)
        staged, path = await self._in_thread(stage)
        return await self._apply_staged(model_id, staged, "disk", path, started)

    async def _apply_sharded(self, model_id: str, path: Path, started: float) -> pb.UpdateWeightsResponse:
        """A tensor-parallel model: every rank stages and applies its slices in one step under the
        model's lock (the ranks agree that all staged before any applies)."""

        def apply() -> tuple[int, int, int]:
            with self.registry.get_model_mut(model_id, allow_sleeping=True) as current:
                entry = self.registry.get_entry(model_id)
                if entry.released is not None and memory.WEIGHTS in entry.released.tags:
                    raise ModelSleeping(f"model {model_id!r} released its weights while the update arrived")
                count, nbytes = current.update_weights_from_dir(path)
                entry.weights_version += 1
                entry.weights_source = path
                return entry.weights_version, count, nbytes

        version, count, nbytes = await self._locked(model_id, apply)
        seconds = time.perf_counter() - started
        note(weights_version=version, source="disk", bytes=nbytes)
        self.observer.weights_updated(model_id, "disk", seconds)
        return pb.UpdateWeightsResponse(
            weights_version=version, update_seconds=seconds, num_tensors=count, bytes=nbytes
        )

    # -- UpdateWeightsFromStream -----------------------------------------------------------------
    @rpc_method("UpdateWeightsFromStream")
    async def UpdateWeightsFromStream(
        self, request_iterator: AsyncIterator[pb.WeightsChunk], context: grpc.aio.ServicerContext
    ) -> pb.UpdateWeightsResponse:
        started = time.perf_counter()
        model_id = ""
        model = target = assembler = None
        async for chunk in request_iterator:
            if assembler is None:
                if not chunk.model_id:
                    raise InvalidArgument("the first WeightsChunk of a stream must name model_id")
                model_id = validate_model_id(chunk.model_id)
                note(model_id=model_id)  # the log line's model field reads the request, not a stream
                model = self._resident_model(model_id)
                _refuse_sharded(model, model_id, "UpdateWeightsFromStream")
                target = update_target(model)
                assembler = TensorAssembler(TensorChecker(target), where=f"weights stream for {model_id!r}")
            elif chunk.model_id and chunk.model_id != model_id:
                raise InvalidArgument(
                    f"a WeightsChunk names model {chunk.model_id!r}, but the stream updates {model_id!r}"
                )
            t = chunk.tensor
            assembler.add(
                chunk.name,
                wire_dtype(t.dtype, f"tensor {chunk.name!r}"),
                t.shape,
                t.data,
                chunk.offset,
                chunk.total_bytes,
            )
        if assembler is None:
            raise InvalidArgument("the weights stream is empty: its first WeightsChunk must name model_id")
        specs, tensors = assembler.finish()
        plan = await self._in_thread(lambda: check_update(target, specs, where=assembler.where))
        return await self._apply_staged(
            model_id, _Staged(model, target, plan, tensors), "stream", None, started
        )

    # -- torch.distributed broadcast -------------------------------------------------------------
    @rpc_method("InitWeightsGroup")
    async def InitWeightsGroup(
        self, request: pb.InitWeightsGroupRequest, context: grpc.aio.ServicerContext
    ) -> pb.InitWeightsGroupResponse:
        name = request.group_name
        if not GROUP_NAME.fullmatch(name):
            raise InvalidArgument(f"group_name {name!r} must be 1-128 characters of [A-Za-z0-9._-]")
        if not request.master_address:
            raise InvalidArgument("master_address is empty")
        if not 0 < request.master_port < 65536:
            raise InvalidArgument(f"master_port {request.master_port} is outside [1, 65535]")
        world, offset = request.world_size, request.rank_offset
        if world < 2 or not 1 <= offset < world:
            raise InvalidArgument(
                f"world_size {world} and rank_offset {offset}: the trainer is rank 0, so the worker's rank "
                "must be in [1, world_size)"
            )
        device = self.default_device
        if request.model_id:
            device = self._resident_model(validate_model_id(request.model_id)).device
        backend = request.backend.strip().lower() or ("nccl" if device.type == "cuda" else "gloo")
        if backend not in BACKENDS:
            raise InvalidArgument(f"backend {request.backend!r} is not one of {', '.join(BACKENDS)}")
        if backend == "nccl" and device.type != "cuda":
            raise InvalidArgument(f"backend nccl needs a CUDA model; this one is on {device}")
        groups = self._weights_groups()
        if name in groups:
            raise ModelAlreadyExists(f"weights group {name!r} exists; DestroyWeightsGroup first")
        timeout = request.timeout_seconds or DEFAULT_GROUP_TIMEOUT
        thread = single_threaded_executor(1, f"weights-{name}")  # no OpenMP team of its own
        slot = _Group(None, thread, device if backend == "nccl" else torch.device("cpu"))  # type: ignore[arg-type]
        groups[name] = slot  # reserved while joining: a second Init of the name is refused
        try:
            slot.group = await asyncio.get_running_loop().run_in_executor(
                thread,
                lambda: WeightsGroup.join(
                    request.master_address, request.master_port, world, offset, name, backend, timeout
                ),
            )
        except BaseException as exc:
            groups.pop(name, None)
            thread.shutdown(wait=False)
            if isinstance(exc, (RuntimeError, ValueError)):  # rendezvous timed out, port refused, ...
                raise FailedPrecondition(
                    f"could not join weights group {name!r} at {request.master_address}:{request.master_port} "
                    f"as rank {offset} of {world} within {timeout:g} s: {exc}"
                ) from None
            raise
        note(group=name, backend=backend, rank=offset, world_size=world)
        return pb.InitWeightsGroupResponse()

    def _group(self, name: str) -> _Group:
        slot = self._weights_groups().get(name)
        if slot is None or slot.group is None:
            raise NotFound(f"weights group {name!r} does not exist (InitWeightsGroup first)")
        return slot

    @rpc_method("UpdateWeightsFromDistributed")
    async def UpdateWeightsFromDistributed(
        self, request: pb.UpdateWeightsFromDistributedRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateWeightsResponse:
        model_id = validate_model_id(request.model_id)
        started = time.perf_counter()
        slot = self._group(request.group_name)
        n = len(request.names)
        if n == 0:
            raise InvalidArgument("names is empty")
        if len(request.dtypes) != n or len(request.shapes) != n:
            raise InvalidArgument(
                f"names, dtypes and shapes must have one entry per tensor; got {n}, "
                f"{len(request.dtypes)} and {len(request.shapes)}"
            )
        specs = [
            tensor_spec(name, wire_dtype(dtype, f"tensor {name!r}"), shape.dims)
            for name, dtype, shape in zip(request.names, request.dtypes, request.shapes, strict=True)
        ]
        model = self._resident_model(model_id, refuse_quantized=False)  # refused after receiving
        where = f"weights group {request.group_name!r}"
        # The trainer broadcasts every announced tensor whatever the worker thinks of them: receive
        # them all even when the update is refused, so its collectives complete and the group stays
        # usable; refuse after.
        refusal: WeightsMismatch | InvalidArgument | FailedPrecondition | None = None
        plan: UpdatePlan = []
        target = None
        try:
            _refuse_quantized(model, model_id)
            _refuse_sharded(model, model_id, "UpdateWeightsFromDistributed")
            target = update_target(model)
            plan = check_update(target, specs, where=where)
        except (InvalidArgument, FailedPrecondition) as exc:
            refusal = exc

        def receive() -> dict[str, torch.Tensor]:
            if slot.device.type == "cuda":
                torch.cuda.set_device(slot.device)  # NCCL works on the thread's current device
            tensors = {}
            for spec in specs:
                tensor = torch.empty(spec.shape, dtype=spec.dtype, device=slot.device)
                slot.group.broadcast(tensor, src=0)
                tensors[spec.name] = tensor
            return tensors

        async with slot.busy:  # one broadcast sequence at a time per group
            future = asyncio.get_running_loop().run_in_executor(slot.thread, receive)
            tensors = await asyncio.shield(future)
        if refusal is not None:
            raise refusal
        assert target is not None
        source = f"distributed:{slot.group.backend}"
        return await self._apply_staged(
            model_id, _Staged(model, target, plan, tensors), source, None, started
        )

    @rpc_method("DestroyWeightsGroup")
    async def DestroyWeightsGroup(
        self, request: pb.DestroyWeightsGroupRequest, context: grpc.aio.ServicerContext
    ) -> pb.DestroyWeightsGroupResponse:
        slot = self._group(request.group_name)
        async with slot.busy:
            self._weights_groups().pop(request.group_name, None)
            await asyncio.get_running_loop().run_in_executor(slot.thread, slot.group.destroy)
        slot.thread.shutdown(wait=False)
        return pb.DestroyWeightsGroupResponse()

    def destroy_weights_groups(self) -> None:
        """At shutdown: leave every group (best effort; peers see the group go)."""
        for name, slot in list(self._weights_groups().items()):
            self._weights_groups().pop(name, None)
            if slot.group is not None:
                try:
                    slot.thread.submit(slot.group.destroy).result(timeout=5)
                except Exception:  # noqa: BLE001 - a dead peer must not block shutdown
                    pass
            slot.thread.shutdown(wait=False)

    # -- ReleaseMemory / ResumeMemory ------------------------------------------------------------
    @rpc_method("ReleaseMemory")
    async def ReleaseMemory(
        self, request: pb.ReleaseMemoryRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReleaseMemoryResponse:
        model_id = validate_model_id(request.model_id)
        tags = memory.parse_tags(request.tags)
        self.registry.get_entry(model_id)
        started = time.perf_counter()

        def run() -> tuple[int, tuple[int, int]]:
            with self.registry.get_model_mut(model_id, allow_sleeping=True) as model:
                entry = self.registry.get_entry(model_id)
                cuda = model.device.type == "cuda"
                offload = request.offload if request.HasField("offload") else cuda
                quantization = getattr(model, "quantization", "")
                if memory.WEIGHTS in tags and not offload and quantization:
                    # Re-reading would mean unpacking and quantizing the checkpoint again.
                    if request.HasField("offload"):
                        raise FailedPrecondition(
                            f"model {model_id!r} is quantized ({quantization}): its weights are kept on "
                            "the host when released; release them with offload: true"
                        )
                    offload = True
                if memory.WEIGHTS in tags and not offload and entry.weights_source is None:
                    if request.HasField("offload"):
                        raise FailedPrecondition(
                            f"model {model_id!r} holds weights from a stream or broadcast, which exist on no "
                            "disk to read again; release them with offload: true, or UpdateWeights from a "
                            "directory first"
                        )
                    offload = True  # nothing to re-read: keep a host copy
                entry.released, freed = memory.release(model, entry.released, tags, offload)
                if entry.released.tags:
                    entry.state = ModelState.SLEEPING
                dev.release_cached_memory(model.device, collect=False)
                return freed, _resident(entry)

        freed, resident = await self._locked(model_id, run)
        self.observer.memory_resident(model_id, *resident)
        seconds = time.perf_counter() - started
        note(tags=list(tags), released_bytes=freed)
        return pb.ReleaseMemoryResponse(released_bytes=freed, release_seconds=seconds)

    @rpc_method("ResumeMemory")
    async def ResumeMemory(
        self, request: pb.ResumeMemoryRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResumeMemoryResponse:
        model_id = validate_model_id(request.model_id)
        tags = memory.parse_tags(request.tags)
        self.registry.get_entry(model_id)
        started = time.perf_counter()

        def run() -> tuple[int, tuple[int, int]]:
            with self.registry.get_model_mut(model_id, allow_sleeping=True) as model:
                entry = self.registry.get_entry(model_id)
                if entry.released is None:
                    return 0, _resident(entry)

                def reread() -> None:
                    source = entry.weights_source
                    if source is None:  # release() keeps a host copy in this case; never reached
                        raise FailedPrecondition(
                            f"model {model_id!r}: no checkpoint to read the weights from"
                        )
                    target = update_target(model)
                    try:
                        load_weights(target.network, self.registry.resolve_dir(source), target.mapping)
                    except (InvalidArgument, NotFound) as exc:
                        raise FailedPrecondition(
                            f"model {model_id!r}: cannot read its weights again from {source}: {exc}"
                        ) from None

                entry.released, restored = memory.resume(model, entry.released, tags, reread)
                if entry.released is None:
                    entry.state = ModelState.READY
                return restored, _resident(entry)

        restored, resident = await self._locked(model_id, run)
        self.observer.memory_resident(model_id, *resident)
        seconds = time.perf_counter() - started
        note(tags=list(tags), resumed_bytes=restored)
        return pb.ResumeMemoryResponse(resume_seconds=seconds, resumed_bytes=restored)


def _sharded(model: object) -> bool:
    return getattr(model, "tensor_parallel_size", 1) > 1


def _refuse_quantized(model: object, model_id: str) -> None:
    """Updates carry dense tensors by checkpoint name; a quantized model holds repacked codes under
    other names. Load the new weights as a model instead (quantized again at Load)."""
    quantization = getattr(model, "quantization", "")
    if quantization:
        raise FailedPrecondition(
            f"model {model_id!r} is quantized ({quantization}); weight updates and broadcasts need a "
            "dense model: Load the updated checkpoint (with the same quantization) instead"
        )


def _refuse_sharded(model: object, model_id: str, rpc: str) -> None:
    """Tensors sent to the worker reach rank 0 alone; a sharded model's other ranks need their
    slices too, which only a checkpoint directory (read by every rank) gives them."""
    if _sharded(model):
        raise FailedPrecondition(
            f"{rpc} cannot update model {model_id!r}: it is sharded over "
            f"{model.tensor_parallel_size} tensor-parallel ranks and the tensors would reach rank 0 only; "
            "use UpdateWeights with a checkpoint directory, from which every rank reads its slices"
        )


def _resident(entry: object) -> tuple[int, int]:
    """(weight bytes, KV cache bytes) the entry's model holds now."""
    model = entry.model
    released = released_tags(entry)
    weights = 0 if memory.WEIGHTS in released else model.weight_bytes
    kv = 0 if memory.KV_CACHE in released else model.cache_spec.total_bytes
    return weights, kv


def released_tags(entry: object) -> list[str]:
    released = getattr(entry, "released", None)
    return list(released.tags) if released is not None else []


__all__ = ["WeightsServicerMixin", "released_tags", "wire_dtype"]
