"""Client methods for weight updates and memory release, mixed into `ModelWorkerClient` and
`AsyncModelWorkerClient` (worker/client.py): the request encoders and result types are shared, so
the blocking and asyncio twins cannot drift apart.

Tensors for `update_weights_from_stream` are numpy arrays or torch tensors (torch is imported only
when a torch tensor is given); they are sent as checkpoint names, cut into pieces of `chunk_bytes`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .pb.modelworker.v1 import worker_pb2 as pb

DEFAULT_CHUNK_BYTES = 16 * 1024 * 1024  # well under the worker's default 256 MiB message cap
_NUMPY_TO_WIRE: dict[str, int] = {
    "float32": pb.FLOAT32,
    "float16": pb.FLOAT16,
    "int32": pb.INT32,
    "int64": pb.INT64,
    "int8": pb.INT8,
    "uint8": pb.UINT8,
    "int16": pb.INT16,
}
# torch dtype name → (wire dtype, the numpy dtype its bytes travel as)
_TORCH_TO_WIRE: dict[str, tuple[int, str]] = {
    "float32": (pb.FLOAT32, "float32"),
    "float16": (pb.FLOAT16, "float16"),
    "bfloat16": (pb.BFLOAT16, "int16"),
    "int32": (pb.INT32, "int32"),
    "int64": (pb.INT64, "int64"),
    "int8": (pb.INT8, "int8"),
    "uint8": (pb.UINT8, "uint8"),
    "int16": (pb.INT16, "int16"),
    "float8_e4m3fn": (pb.FLOAT8_E4M3FN, "uint8"),
}
TensorLike = Any  # numpy.ndarray | torch.Tensor


@dataclass(frozen=True)
class UpdateWeightsResult:
    """`weights_version`: the model's version after this update (+1 per applied update)."""

    weights_version: int
    update_seconds: float
    num_tensors: int
    bytes: int


@dataclass(frozen=True)
class ReleaseMemoryResult:
    released_bytes: int
    release_seconds: float


@dataclass(frozen=True)
class ResumeMemoryResult:
    resumed_bytes: int
    resume_seconds: float


def wire_dtype(dtype: Any) -> int:
    """A DType enum value from "float32", a numpy dtype or a torch dtype."""
    name = str(dtype).removeprefix("torch.")
    if name in _TORCH_TO_WIRE:
        return _TORCH_TO_WIRE[name][0]
    raise ValueError(f"dtype {dtype!r} cannot travel as a checkpoint tensor")


def tensor_payload(value: TensorLike) -> tuple[int, list[int], np.ndarray]:
    """(DType, shape, little-endian row-major bytes as a flat uint8 array) of a numpy array or a
    torch tensor (a view where the value is already contiguous, little-endian and on the CPU)."""
    if type(value).__module__.startswith("torch"):
        wire, as_numpy = _TORCH_TO_WIRE.get(str(value.dtype).removeprefix("torch."), (None, ""))
        if wire is None:
            raise ValueError(f"dtype {value.dtype} cannot travel as a checkpoint tensor")
        import torch

        t = value.detach().contiguous().cpu()
        array = t.view(getattr(torch, as_numpy)).numpy()
        shape = list(t.shape)
    else:
        array = np.ascontiguousarray(value)
        if array.dtype.name not in _NUMPY_TO_WIRE:
            raise ValueError(f"dtype {array.dtype} cannot travel as a checkpoint tensor")
        wire, shape = _NUMPY_TO_WIRE[array.dtype.name], list(array.shape)
    if sys.byteorder != "little" or array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return wire, shape, array.reshape(-1).view(np.uint8)


def weight_chunks(
    model_id: str,
    tensors: Mapping[str, TensorLike] | Iterable[tuple[str, TensorLike]],
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Iterator[pb.WeightsChunk]:
    """The messages of one UpdateWeightsFromStream: each tensor in pieces of at most chunk_bytes,
    the first message naming model_id. Tensors are encoded one at a time, as the stream goes."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    first = True
    for name, value in items:
        wire, shape, data = tensor_payload(value)
        offset = 0
        while True:
            piece = data[offset : offset + chunk_bytes].tobytes()  # the one copy, piece by piece
            yield pb.WeightsChunk(
                model_id=model_id if first else "",
                name=name,
                tensor=pb.Tensor(dtype=wire, shape=shape, data=piece),
                offset=offset,
                total_bytes=len(data),
            )
            first = False
            offset += len(piece)
            if offset >= len(data):
                break


def _distributed_request(
    model_id: str, group_name: str, specs: Sequence[tuple[str, Any, Sequence[int]]]
) -> pb.UpdateWeightsFromDistributedRequest:
    request = pb.UpdateWeightsFromDistributedRequest(model_id=model_id, group_name=group_name)
    for name, dtype, shape in specs:
        request.names.append(name)
        request.dtypes.append(wire_dtype(dtype))
        request.shapes.add(dims=[int(d) for d in shape])
    return request


def _init_group_request(
    model_id: str,
    master_address: str,
    master_port: int,
    world_size: int,
    rank_offset: int,
    group_name: str,
    backend: str,
    timeout_seconds: float,
) -> pb.InitWeightsGroupRequest:
    return pb.InitWeightsGroupRequest(
        model_id=model_id,
        master_address=master_address,
        master_port=master_port,
        world_size=world_size,
        rank_offset=rank_offset,
        group_name=group_name,
        backend=backend,
        timeout_seconds=timeout_seconds,
    )


def _release_request(model_id: str, tags: Sequence[str], offload: bool | None) -> pb.ReleaseMemoryRequest:
    request = pb.ReleaseMemoryRequest(model_id=model_id, tags=list(tags))
    if offload is not None:
        request.offload = offload
    return request


def _update_result(msg: pb.UpdateWeightsResponse) -> UpdateWeightsResult:
    return UpdateWeightsResult(msg.weights_version, msg.update_seconds, msg.num_tensors, msg.bytes)


class WeightsClientMethods:
    """The blocking methods (needs `_call` and `_stub` from the client)."""

    def update_weights(
        self, model_id: str, model_dir: str | Path, *, timeout: float | None = None
    ) -> UpdateWeightsResult:
        """New weights from a checkpoint directory (inside a model root) of the same architecture
        and shapes; all or nothing."""
        request = pb.UpdateWeightsRequest(model_id=model_id, model_dir=str(model_dir))
        return _update_result(self._call("UpdateWeights", self._stub, request, timeout))

    def update_weights_from_stream(
        self,
        model_id: str,
        tensors: Mapping[str, TensorLike] | Iterable[tuple[str, TensorLike]],
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        timeout: float | None = None,
    ) -> UpdateWeightsResult:
        """Send every checkpoint tensor (name → numpy array or torch tensor); applied only when all
        of them arrived and passed the worker's checks."""
        chunks = weight_chunks(model_id, tensors, chunk_bytes)
        return _update_result(self._call("UpdateWeightsFromStream", self._stub, chunks, timeout))

    def init_weights_group(
        self,
        master_address: str,
        master_port: int,
        world_size: int,
        group_name: str,
        *,
        model_id: str = "",
        rank_offset: int = 1,
        backend: str = "",
        timeout_seconds: float = 0.0,
        timeout: float | None = None,
    ) -> None:
        """Have the worker join a torch.distributed group whose rank 0 is the trainer. Returns when
        the group is formed, so the trainer joins (`WeightsGroup.join(..., rank=0)`) meanwhile."""
        request = _init_group_request(
            model_id,
            master_address,
            master_port,
            world_size,
            rank_offset,
            group_name,
            backend,
            timeout_seconds,
        )
        self._call("InitWeightsGroup", self._stub, request, timeout)

    def update_weights_from_distributed(
        self,
        model_id: str,
        group_name: str,
        specs: Sequence[tuple[str, Any, Sequence[int]]],
        *,
        timeout: float | None = None,
    ) -> UpdateWeightsResult:
        """Receive the tensors `specs` = [(name, dtype, shape)] that rank 0 broadcasts, in order."""
        request = _distributed_request(model_id, group_name, specs)
        return _update_result(self._call("UpdateWeightsFromDistributed", self._stub, request, timeout))

    def destroy_weights_group(self, group_name: str, *, timeout: float | None = None) -> None:
        request = pb.DestroyWeightsGroupRequest(group_name=group_name)
        self._call("DestroyWeightsGroup", self._stub, request, timeout)

    def release_memory(
        self,
        model_id: str,
        tags: Sequence[str] = (),
        *,
        offload: bool | None = None,
        timeout: float | None = None,
    ) -> ReleaseMemoryResult:
        """Free "weights" and/or "kv_cache" (none: both); the model is SLEEPING until resumed.
        offload None: host copy on CUDA, re-read from the checkpoint on CPU."""
        response = self._call("ReleaseMemory", self._stub, _release_request(model_id, tags, offload), timeout)
        return ReleaseMemoryResult(response.released_bytes, response.release_seconds)

    def resume_memory(
        self, model_id: str, tags: Sequence[str] = (), *, timeout: float | None = None
    ) -> ResumeMemoryResult:
        request = pb.ResumeMemoryRequest(model_id=model_id, tags=list(tags))
        response = self._call("ResumeMemory", self._stub, request, timeout)
        return ResumeMemoryResult(response.resumed_bytes, response.resume_seconds)


class AsyncWeightsClientMethods:
    """The asyncio twins of `WeightsClientMethods`."""

    async def update_weights(
        self, model_id: str, model_dir: str | Path, *, timeout: float | None = None
    ) -> UpdateWeightsResult:
        request = pb.UpdateWeightsRequest(model_id=model_id, model_dir=str(model_dir))
        return _update_result(await self._call("UpdateWeights", self._stub, request, timeout))

    async def update_weights_from_stream(
        self,
        model_id: str,
        tensors: Mapping[str, TensorLike] | Iterable[tuple[str, TensorLike]],
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        timeout: float | None = None,
    ) -> UpdateWeightsResult:
        chunks = weight_chunks(model_id, tensors, chunk_bytes)
        return _update_result(await self._call("UpdateWeightsFromStream", self._stub, chunks, timeout))

    async def init_weights_group(
        self,
        master_address: str,
        master_port: int,
        world_size: int,
        group_name: str,
        *,
        model_id: str = "",
        rank_offset: int = 1,
        backend: str = "",
        timeout_seconds: float = 0.0,
        timeout: float | None = None,
    ) -> None:
        request = _init_group_request(
            model_id,
            master_address,
            master_port,
            world_size,
            rank_offset,
            group_name,
            backend,
            timeout_seconds,
        )
        await self._call("InitWeightsGroup", self._stub, request, timeout)

    async def update_weights_from_distributed(
        self,
        model_id: str,
        group_name: str,
        specs: Sequence[tuple[str, Any, Sequence[int]]],
        *,
        timeout: float | None = None,
    ) -> UpdateWeightsResult:
        request = _distributed_request(model_id, group_name, specs)
        return _update_result(await self._call("UpdateWeightsFromDistributed", self._stub, request, timeout))

    async def destroy_weights_group(self, group_name: str, *, timeout: float | None = None) -> None:
        request = pb.DestroyWeightsGroupRequest(group_name=group_name)
        await self._call("DestroyWeightsGroup", self._stub, request, timeout)

    async def release_memory(
        self,
        model_id: str,
        tags: Sequence[str] = (),
        *,
        offload: bool | None = None,
        timeout: float | None = None,
    ) -> ReleaseMemoryResult:
        request = _release_request(model_id, tags, offload)
        response = await self._call("ReleaseMemory", self._stub, request, timeout)
        return ReleaseMemoryResult(response.released_bytes, response.release_seconds)

    async def resume_memory(
        self, model_id: str, tags: Sequence[str] = (), *, timeout: float | None = None
    ) -> ResumeMemoryResult:
        request = pb.ResumeMemoryRequest(model_id=model_id, tags=list(tags))
        response = await self._call("ResumeMemory", self._stub, request, timeout)
        return ResumeMemoryResult(response.resumed_bytes, response.resume_seconds)


__all__ = [
    "AsyncWeightsClientMethods",
    "ReleaseMemoryResult",
    "ResumeMemoryResult",
    "UpdateWeightsResult",
    "WeightsClientMethods",
    "tensor_payload",
    "weight_chunks",
    "wire_dtype",
]
