"""A typed Python client for the ModelWorker gRPC API: `ModelWorkerClient` (blocking) and
`AsyncModelWorkerClient` (asyncio), one method per RPC plus a health check.

Python types go in and come out: token ids as lists or numpy/torch integer arrays; results as frozen
dataclasses whose logits are numpy float32 arrays (or torch tensors in the wire dtype with
`as_torch=True`). Every non-OK status is raised as a subclass of `ModelWorkerClientError` that keeps
the code, the details and the worker's request id.

    with ModelWorkerClient("localhost:50051", timeout=30) as client:
        client.load("smollm2", "smollm2-135m")
        out = client.forward("smollm2", [1, 2, 3], logits_dtype="bfloat16")
        out.logits.shape, out.next_token_ids

Both clients share the request encoders and response decoders below, so they cannot drift apart.
The client needs grpcio and numpy only; torch is imported only when `as_torch=True` asks for it.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import grpc
import grpc.aio
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .client_weights import (
    AsyncWeightsClientMethods,
    ReleaseMemoryResult,
    ResumeMemoryResult,
    UpdateWeightsResult,
    WeightsClientMethods,
)
from .pb.modelworker.v1 import worker_pb2 as pb
from .pb.modelworker.v1 import worker_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    import torch

__all__ = [
    "AbortedError",
    "AlreadyExistsError",
    "AsyncModelWorkerClient",
    "CancelledError",
    "DataLossError",
    "DeadlineExceededError",
    "DeviceInfo",
    "FailedPreconditionError",
    "ForwardResult",
    "InternalError",
    "InvalidArgumentError",
    "KvBlocks",
    "KvImportResult",
    "KvLayout",
    "KvCacheConfig",
    "KvSlice",
    "Limits",
    "LoadResult",
    "ModelInfo",
    "ModelWorkerClient",
    "ModelWorkerClientError",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "ReleaseMemoryResult",
    "ResourceExhaustedError",
    "ResumeMemoryResult",
    "SamplingParams",
    "SequenceOutput",
    "TlsConfig",
    "TokenLogprob",
    "TopK",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
    "UnloadResult",
    "UpdateWeightsResult",
    "WorkerInfo",
    "decode_tensor",
    "error_class_for",
]

LogitsMode = Literal["last", "all", "none"]
LogitsDType = Literal["float32", "float16", "bfloat16"]
# Anything np.asarray turns into an integer array: lists, tuples, numpy arrays, CPU torch tensors.
TokenIds: TypeAlias = "Sequence[int] | Sequence[Sequence[int]] | np.ndarray | torch.Tensor"

REQUEST_ID_KEY = "x-request-id"  # trailing metadata of a failed call (worker/status.py)
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # the worker's default cap
_RESPONSE_HEADROOM = 1024 * 1024  # the worker may send max_message_bytes plus framing

_LOGITS_MODES: dict[str, int] = {"last": pb.LOGITS_LAST, "all": pb.LOGITS_ALL, "none": pb.LOGITS_NONE}
_LOGPROBS_MODES: dict[str, int] = {"raw": pb.LOGPROBS_RAW, "processed": pb.LOGPROBS_PROCESSED}
_LOGITS_DTYPES: dict[str, int] = {"float32": pb.FLOAT32, "float16": pb.FLOAT16, "bfloat16": pb.BFLOAT16}
# Wire dtype → little-endian numpy dtype of its bytes (bfloat16 travels as its 16 raw bits).
_WIRE_NUMPY: dict[int, str] = {
    pb.FLOAT32: "<f4",
    pb.FLOAT16: "<f2",
    pb.BFLOAT16: "<u2",
    pb.INT32: "<i4",
    pb.INT64: "<i8",
}
_WIRE_DTYPES: dict[int, np.dtype] = {code: np.dtype(name) for code, name in _WIRE_NUMPY.items()}
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
# KV block dtypes: name and the numpy dtype of their raw bytes (bfloat16: its 16 bits, kept exact).
_KV_DTYPES: dict[int, tuple[str, str]] = {
    pb.FLOAT32: ("float32", "<f4"),
    pb.FLOAT16: ("float16", "<f2"),
    pb.BFLOAT16: ("bfloat16", "<u2"),
}
KV_CHUNK_BYTES = 1024 * 1024  # payload of one ImportKvBlocks chunk (under the message cap)


# -- errors ----------------------------------------------------------------------------------------
class ModelWorkerClientError(Exception):
    """A call failed with a non-OK status. `request_id` is the id the worker logged the failure under
    (sent for INTERNAL and every other error the servicer raised), or None."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self, method: str, code: grpc.StatusCode, details: str, request_id: str | None = None
    ) -> None:
        self.method = method
        self.code = code
        self.details = details
        self.request_id = request_id
        where = f" (request id {request_id})" if request_id else ""
        super().__init__(f"{method}: {code.name}: {details}{where}")


class CancelledError(ModelWorkerClientError):
    code = grpc.StatusCode.CANCELLED


class UnknownError(ModelWorkerClientError):
    code = grpc.StatusCode.UNKNOWN


class InvalidArgumentError(ModelWorkerClientError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceededError(ModelWorkerClientError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFoundError(ModelWorkerClientError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(ModelWorkerClientError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDeniedError(ModelWorkerClientError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhaustedError(ModelWorkerClientError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPreconditionError(ModelWorkerClientError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class AbortedError(ModelWorkerClientError):
    code = grpc.StatusCode.ABORTED


class OutOfRangeError(ModelWorkerClientError):
    code = grpc.StatusCode.OUT_OF_RANGE


class UnimplementedError(ModelWorkerClientError):
    code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(ModelWorkerClientError):
    code = grpc.StatusCode.INTERNAL


class UnavailableError(ModelWorkerClientError):
    code = grpc.StatusCode.UNAVAILABLE


class DataLossError(ModelWorkerClientError):
    code = grpc.StatusCode.DATA_LOSS


class UnauthenticatedError(ModelWorkerClientError):
    code = grpc.StatusCode.UNAUTHENTICATED


_ERRORS: dict[grpc.StatusCode, type[ModelWorkerClientError]] = {
    cls.code: cls
    for cls in (
        CancelledError,
        UnknownError,
        InvalidArgumentError,
        DeadlineExceededError,
        NotFoundError,
        AlreadyExistsError,
        PermissionDeniedError,
        ResourceExhaustedError,
        FailedPreconditionError,
        AbortedError,
        OutOfRangeError,
        UnimplementedError,
        InternalError,
        UnavailableError,
        DataLossError,
        UnauthenticatedError,
    )
}


def error_class_for(code: grpc.StatusCode) -> type[ModelWorkerClientError]:
    """The exception class raised for a status code (every code but OK has its own)."""
    if code is grpc.StatusCode.OK:
        raise ValueError("OK is not an error")
    return _ERRORS.get(code, UnknownError)


def _error_from_rpc(exc: grpc.RpcError, method: str) -> ModelWorkerClientError:
    # Sync errors are also grpc.Call and aio errors are AioRpcError: both have these accessors.
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    code = code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else None) or str(exc)
    request_id = None
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == REQUEST_ID_KEY:
            request_id = value.decode() if isinstance(value, bytes) else str(value)
    return error_class_for(code)(method, code, details, request_id)


# -- results ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KvCacheConfig:
    """KV cache sizing for a Load; 0 means the worker's default for every field."""

    block_size: int = 0
    num_blocks: int = 0
    max_bytes: int = 0
    max_seq_len: int = 0
    max_batch_size: int = 0


@dataclass(frozen=True)
class ModelInfo:
    """A model as the worker reports it. `state` is "LOADING", "READY", "SLEEPING" or "UNLOADING"; the sizes
    are zero while a model is still loading."""

    id: str
    architecture: str
    model_dir: str
    device: str
    dtype: str
    state: str
    num_parameters: int
    weight_bytes: int
    kv_cache_bytes: int
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    sliding_window: int
    kv_block_size: int
    kv_num_blocks: int
    max_seq_len: int
    max_batch_size: int
    attention_backend: str
    is_quant_model: bool
    load_seconds: float
    loaded_at: dt.datetime | None
    load_mode: str = ""  # "mmap": part of the weights are views of the mapped checkpoint; "copy"
    mapped_weight_bytes: int = 0  # that part of weight_bytes (file-backed, shared page cache)
    weights_version: int = 0  # +1 per applied weight update
    released: tuple[str, ...] = ()  # memory tags ReleaseMemory freed (state "SLEEPING")
    quantization: str = ""
    compile_seconds: float = 0.0  # spent compiling decode steps (load(compile_decode=True))
    cpu_gemm: str = ""  # the dense layers' matmul kernels: "torch", "onednn" or "GEMV+GEMM" (e.g. "mv+torch")


@dataclass(frozen=True)
class LoadResult:
    model: ModelInfo
    already_loaded: bool


@dataclass(frozen=True)
class UnloadResult:
    unload_seconds: float
    freed_bytes: int


@dataclass(frozen=True)
class TopK:
    """Best-first candidates of one logits row with their natural-log probabilities."""

    token_ids: list[int]
    logprobs: list[float]


@dataclass(frozen=True)
class SamplingParams:
    """How the worker picks a sequence's next token (README "Sampling on the worker"). The defaults
    are off: temperature 0 is greedy; top_p 1, min_p 0, top_k 0 and repetition_penalty 1 filter
    nothing. A seeded sequence draws the same token alone or in any batch."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    prompt_token_ids: Sequence[int] = ()
    output_token_ids: Sequence[int] = ()
    logprobs: int = 0  # 0..20 top candidates reported with each emitted token


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    rank: int  # 1 = most likely
    top_token_ids: list[int]
    top_logprobs: list[float]


@dataclass(frozen=True)
class SequenceOutput:
    """What one sequence emitted: accepted drafts, then one more token (a single token without
    drafts); `logprobs` has one entry per emitted token when logprobs > 0 was asked."""

    token_ids: list[int]
    num_accepted_drafts: int
    logprobs: list[TokenLogprob]


@dataclass(frozen=True)
class ForwardResult:
    """`logits`: [rows, vocab] (None with logits_mode "none"); numpy float32 by default, a torch
    tensor in `logits_dtype` with as_torch=True. `next_token_ids`: the argmax at each sequence's last
    position (computed by the worker in float32, whatever the wire dtype)."""

    logits: np.ndarray | torch.Tensor | None
    logits_dtype: str
    next_token_ids: list[int]
    top_k: list[TopK]
    compute_seconds: float
    weights_version: int = 0  # the weights that computed this result
    outputs: list[SequenceOutput] = field(default_factory=list)  # one per sequence


@dataclass(frozen=True)
class KvSlice:
    """K and V of one layer of the contiguous cache: [max_batch_size, num_kv_heads, length, head_dim]."""

    key: np.ndarray | torch.Tensor
    value: np.ndarray | torch.Tensor


@dataclass(frozen=True)
class KvLayout:
    """What a paged cache's blocks hold; blocks move only between equal layouts."""

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # "float32", "float16", "bfloat16"


@dataclass(frozen=True)
class KvBlocks:
    """Exported KV blocks in host memory. `key`/`value`: [num_layers, len(block_ids), block_size,
    num_kv_heads, head_dim] raw values (float32 / float16 arrays; bfloat16 as its uint16 bits, so a
    round trip is bit-exact). `block_ids`: the exporting worker's ids, in the export's order."""

    layout: KvLayout
    block_ids: list[int]
    key: np.ndarray
    value: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.key.nbytes + self.value.nbytes)

    def as_torch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V as CPU torch tensors in the cache dtype (bfloat16 reinterpreted, not converted)."""
        import torch

        def one(array: np.ndarray) -> torch.Tensor:
            if self.layout.dtype == "bfloat16":
                return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
            return torch.from_numpy(array)

        return one(self.key), one(self.value)


@dataclass(frozen=True)
class KvImportResult:
    blocks: int
    bytes: int


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    description: str
    total_memory_bytes: int
    free_memory_bytes: int


@dataclass(frozen=True)
class Limits:
    max_message_bytes: int
    max_tokens_per_request: int
    max_batch_size: int


@dataclass(frozen=True)
class WorkerInfo:
    version: str
    devices: list[DeviceInfo]
    default_device: str
    default_dtype: str
    attention_backends: list[str]
    limits: Limits
    model_roots: list[str]
    architectures: list[str]


@dataclass(frozen=True)
class TlsConfig:
    """TLS to the worker. `root_certificates` verifies the server (None: the system roots);
    `certificate_chain` and `private_key` present a client certificate (mutual TLS);
    `server_name` overrides the name checked against the server certificate."""

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    server_name: str | None = None

    @classmethod
    def from_files(
        cls,
        root_certificates: str | Path | None = None,
        certificate_chain: str | Path | None = None,
        private_key: str | Path | None = None,
        server_name: str | None = None,
    ) -> TlsConfig:
        def read(path: str | Path | None) -> bytes | None:
            return Path(path).read_bytes() if path is not None else None

        return cls(read(root_certificates), read(certificate_chain), read(private_key), server_name)

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("mutual TLS needs both certificate_chain and private_key")
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)


# -- tensors ---------------------------------------------------------------------------------------
def decode_tensor(msg: pb.Tensor, *, as_torch: bool = False) -> np.ndarray | torch.Tensor:
    """A Tensor message as numpy (floats widened to float32, exactly; ints as int32/int64), or as a
    CPU torch tensor in the wire dtype (as_torch=True)."""
    code = msg.dtype
    wire = _WIRE_DTYPES.get(code)
    if wire is None:
        raise ValueError(f"tensor dtype {code} is not a known DType")
    shape = tuple(msg.shape)
    numel = math.prod(shape)
    data = msg.data  # every read of a bytes field copies it out of the message: read it once
    if len(data) != numel * wire.itemsize:
        raise ValueError(
            f"tensor of shape {list(shape)} and dtype {pb.DType.Name(code)} needs "
            f"{numel * wire.itemsize} bytes, got {len(data)}"
        )
    raw = np.frombuffer(data, dtype=wire).reshape(shape)
    if as_torch:
        import torch

        tensor = torch.from_numpy(raw.astype(wire.newbyteorder("=")))  # native order, writable
        return tensor.view(torch.bfloat16) if code == pb.BFLOAT16 else tensor
    if code == pb.BFLOAT16:
        # bfloat16 is the top half of a float32: widen the 16 bits into the high half of 32 (exact).
        return np.left_shift(raw, 16, dtype=np.uint32).view(np.float32)
    if code == pb.FLOAT16:
        return raw.astype(np.float32)
    return raw.astype(wire.newbyteorder("="))  # native byte order, and a writable copy


# -- KV blocks -------------------------------------------------------------------------------------
class _KvCollector:
    """Assembles ExportKvBlocks chunks into one KvBlocks (host arrays allocated at the first chunk)."""

    def __init__(self, block_ids: list[int]) -> None:
        self.block_ids = block_ids
        self.position = {b: i for i, b in enumerate(block_ids)}
        self.layout: KvLayout | None = None
        self.key = self.value = np.empty(0)
        self.covered = np.zeros(0, dtype=bool)

    def add(self, chunk: pb.KvBlocksChunk) -> None:
        if self.layout is None:
            lay = chunk.layout
            if lay.dtype not in _KV_DTYPES:
                raise ValueError(f"exported blocks have dtype {lay.dtype}, which this client does not know")
            self.layout = KvLayout(
                lay.num_layers, lay.block_size, lay.num_kv_heads, lay.head_dim, _KV_DTYPES[lay.dtype][0]
            )
            self._wire = np.dtype(_KV_DTYPES[lay.dtype][1])
            shape = (lay.num_layers, len(self.block_ids), lay.block_size, lay.num_kv_heads, lay.head_dim)
            self.key = np.empty(shape, dtype=self._wire.newbyteorder("="))
            self.value = np.empty_like(self.key)
            self.covered = np.zeros(shape[:2], dtype=bool)
        positions: list[int] | slice = [self.position[b] for b in chunk.block_ids]
        first = positions[0] if positions else 0
        if positions == list(range(first, first + len(positions))):
            positions = slice(first, first + len(positions))  # a run (as exported): no fancy-index copy
        layers = slice(chunk.layer_start, chunk.layer_end)
        for out, msg in ((self.key, chunk.key), (self.value, chunk.value)):
            out[layers, positions] = np.frombuffer(msg.data, dtype=self._wire).reshape(tuple(msg.shape))
        self.covered[layers, positions] = True

    def result(self) -> KvBlocks:
        if self.layout is None or not self.covered.all():
            raise ValueError("the export stream ended before every layer of every block arrived")
        return KvBlocks(self.layout, self.block_ids, self.key, self.value)


def _kv_chunk_size(chunk_bytes: int, client_cap: int, worker_cap: int, blocks: KvBlocks) -> int:
    """Payload bytes per chunk: what was asked, under both message caps less the ids and framing."""
    framing = 4096 + 12 * len(blocks.block_ids)
    return min(chunk_bytes, client_cap - framing, (worker_cap or client_cap) - framing)


def _kv_chunks(
    model_id: str, dst_block_ids: Sequence[int], blocks: KvBlocks, max_bytes: int
) -> Iterator[pb.KvBlocksChunk]:
    """ImportKvBlocks chunks: whole layers while a layer of every block fits in max_bytes, else one
    layer of as many blocks as fit. The first chunk names the model, the destinations and the layout."""
    lay = blocks.layout
    dst = _int32_list(_int_array(dst_block_ids, "dst_block_ids"), "dst_block_ids")
    n = len(blocks.block_ids)
    if len(dst) != n:
        raise ValueError(f"{len(dst)} dst_block_ids for {n} blocks")
    want = (lay.num_layers, n, lay.block_size, lay.num_kv_heads, lay.head_dim)
    if blocks.key.shape != want or blocks.value.shape != want:
        raise ValueError(f"key/value have shapes {blocks.key.shape}/{blocks.value.shape}, expected {want}")
    dtype = next(d for d, (name, _) in _KV_DTYPES.items() if name == lay.dtype)
    per_block = 2 * int(np.prod(want[2:])) * blocks.key.itemsize  # one layer of one block, K and V
    if per_block > max_bytes:
        raise ValueError(f"one layer of one block takes {per_block} bytes, over the chunk size {max_bytes}")
    if per_block * n <= max_bytes:
        step = max_bytes // (per_block * n)
        plan = [(l0, min(l0 + step, lay.num_layers), 0, n) for l0 in range(0, lay.num_layers, step)]
    else:
        step = max_bytes // per_block
        plan = [
            (layer, layer + 1, b0, min(b0 + step, n))
            for layer in range(lay.num_layers)
            for b0 in range(0, n, step)
        ]
    return _kv_chunk_stream(model_id, dst, blocks, dtype, plan)  # checked now, encoded as sent


def _kv_chunk_stream(
    model_id: str, dst: list[int], blocks: KvBlocks, dtype: int, plan: list[tuple[int, int, int, int]]
) -> Iterator[pb.KvBlocksChunk]:
    lay = blocks.layout
    wire = np.dtype(_KV_DTYPES[dtype][1])
    for i, (l0, l1, b0, b1) in enumerate(plan):
        chunk = pb.KvBlocksChunk(layer_start=l0, layer_end=l1, block_ids=blocks.block_ids[b0:b1])
        if i == 0:
            chunk.model_id = model_id
            chunk.dst_block_ids.extend(dst)
            chunk.layout.CopyFrom(
                pb.KvLayout(
                    num_layers=lay.num_layers,
                    block_size=lay.block_size,
                    num_kv_heads=lay.num_kv_heads,
                    head_dim=lay.head_dim,
                    dtype=dtype,
                )
            )
        for msg, array in ((chunk.key, blocks.key), (chunk.value, blocks.value)):
            part = array[l0:l1, b0:b1]
            msg.dtype = dtype
            msg.shape.extend(part.shape)
            msg.data = np.ascontiguousarray(part, dtype=wire).tobytes()
        yield chunk


class _KvRelay:
    """Export chunks handed on as import chunks (the first names the destination); an export error
    ends the import stream early and is kept, to be raised instead of the import's complaint."""

    def __init__(self, model_id: str, dst_block_ids: Sequence[int]) -> None:
        self.model_id = model_id
        self.dst = _int32_list(_int_array(dst_block_ids, "dst_block_ids"), "dst_block_ids")
        self.error: ModelWorkerClientError | None = None

    def first(self, chunk: pb.KvBlocksChunk) -> pb.KvBlocksChunk:
        chunk.model_id = self.model_id
        chunk.dst_block_ids.extend(self.dst)
        return chunk

    def failed(self, exc: grpc.RpcError) -> None:
        self.error = _error_from_rpc(exc, "ExportKvBlocks")


# -- request encoders ------------------------------------------------------------------------------
def _int_array(values: Any, field: str, ndim: tuple[int, ...] = (1,)) -> np.ndarray:
    """An int64 array of `values`, checked to be integers of an allowed rank."""
    try:
        array = np.asarray(values)
    except ValueError:
        raise ValueError(f"{field}: rows of different lengths (pad them, or send one call per row)") from None
    if array.size == 0:
        array = array.astype(np.int64)
    if array.dtype == object:
        raise ValueError(f"{field}: rows of different lengths (pad them, or send one call per row)")
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{field} must hold integers, got {array.dtype}")
    if array.ndim not in ndim:
        want = " or ".join(f"{n}-D" for n in ndim)
        raise ValueError(f"{field} must be {want}, got shape {list(array.shape)}")
    return array.astype(np.int64, copy=False)


def _int32_list(array: np.ndarray, field: str) -> list[int]:
    """The proto's token and length fields are int32; out-of-range values fail here, naming the field."""
    flat = array.reshape(-1)
    bad = np.nonzero((flat < _INT32_MIN) | (flat > _INT32_MAX))[0]
    if bad.size:
        raise ValueError(f"{field}[{int(bad[0])}] = {int(flat[bad[0]])} does not fit in int32")
    return flat.tolist()


def _enum(table: Mapping[str, int], value: str, field: str) -> int:
    if value not in table:
        raise ValueError(f"{field} must be one of {', '.join(table)}, got {value!r}")
    return table[value]


def _load_request(
    model_id: str,
    model_dir: str | Path,
    architecture: str,
    is_quant_model: bool,
    dtype: str,
    device: str,
    kv_cache: KvCacheConfig | None,
    attention_backend: str,
    quantization: str = "",
    compile_decode: bool = False,
    cpu_gemm: str = "",
) -> pb.LoadRequest:
    kv = kv_cache or KvCacheConfig()
    return pb.LoadRequest(
        quantization=quantization,
        compile_decode=compile_decode,
        cpu_gemm=cpu_gemm,
        model_id=model_id,
        model_dir=str(model_dir),
        architecture=architecture,
        is_quant_model=is_quant_model,
        dtype=dtype,
        device=device,
        kv_cache=pb.KvCacheConfig(
            block_size=kv.block_size,
            num_blocks=kv.num_blocks,
            max_bytes=kv.max_bytes,
            max_seq_len=kv.max_seq_len,
            max_batch_size=kv.max_batch_size,
        ),
        attention_backend=attention_backend,
    )


def _forward_request(
    model_id: str,
    token_ids: TokenIds,
    positions: TokenIds | None,
    use_cache: bool,
    start_pos: int,
    logits_mode: LogitsMode,
    logits_dtype: LogitsDType,
    top_k: int,
) -> pb.ForwardRequest:
    tokens = _int_array(token_ids, "token_ids", (1, 2))
    batch = tokens.shape[0] if tokens.ndim == 2 else 1
    request = pb.ForwardRequest(
        model_id=model_id,
        token_ids=_int32_list(tokens, "token_ids"),
        batch_size=batch,
        use_cache=use_cache,
        start_pos=start_pos,
        logits_mode=_enum(_LOGITS_MODES, logits_mode, "logits_mode"),
        logits_dtype=_enum(_LOGITS_DTYPES, logits_dtype, "logits_dtype"),
        top_k=top_k,
    )
    if positions is not None:
        pos = _int_array(positions, "positions", (1, 2))
        if pos.shape != tokens.shape:
            raise ValueError(
                f"positions has shape {list(pos.shape)} but token_ids has shape {list(tokens.shape)}"
            )
        request.positions.extend(_int32_list(pos, "positions"))
    return request


def _forward_paged_request(
    model_id: str,
    input_tokens: TokenIds,
    positions: TokenIds,
    block_tables: Sequence[Sequence[int]],
    slot_mapping: TokenIds,
    context_lens: Sequence[int],
    is_prefill: bool,
    query_lens: Sequence[int] | None,
    logits_mode: LogitsMode,
    logits_dtype: LogitsDType,
    top_k: int,
) -> pb.ForwardPagedRequest:
    request = pb.ForwardPagedRequest(
        model_id=model_id,
        input_tokens=_int32_list(_int_array(input_tokens, "input_tokens"), "input_tokens"),
        positions=_int32_list(_int_array(positions, "positions"), "positions"),
        slot_mapping=_int_array(slot_mapping, "slot_mapping").tolist(),
        context_lens=_int32_list(_int_array(context_lens, "context_lens"), "context_lens"),
        is_prefill=is_prefill,
        logits_mode=_enum(_LOGITS_MODES, logits_mode, "logits_mode"),
        logits_dtype=_enum(_LOGITS_DTYPES, logits_dtype, "logits_dtype"),
        top_k=top_k,
    )
    for s, table in enumerate(block_tables):
        field = f"block_tables[{s}]"
        request.block_tables.add(block_ids=_int32_list(_int_array(table, field), field))
    if query_lens is not None:
        request.query_lens.extend(_int32_list(_int_array(query_lens, "query_lens"), "query_lens"))
    return request


def _add_sampling(
    request: pb.ForwardRequest | pb.ForwardPagedRequest,
    sampling: SamplingParams | Sequence[SamplingParams] | None,
    logprobs_mode: Literal["raw", "processed"],
    num_draft_tokens: Sequence[int] | None = None,
) -> None:
    """sampling: one for every sequence, or one per sequence; None keeps the argmax."""
    request.logprobs_mode = _enum(_LOGPROBS_MODES, logprobs_mode, "logprobs_mode")
    if sampling is not None:
        for p in [sampling] if isinstance(sampling, SamplingParams) else sampling:
            msg = request.sampling.add(
                temperature=p.temperature,
                top_k=p.top_k,
                top_p=p.top_p,
                min_p=p.min_p,
                repetition_penalty=p.repetition_penalty,
                presence_penalty=p.presence_penalty,
                frequency_penalty=p.frequency_penalty,
                prompt_token_ids=[int(t) for t in p.prompt_token_ids],
                output_token_ids=[int(t) for t in p.output_token_ids],
                logprobs=p.logprobs,
            )
            if p.seed is not None:
                msg.seed = p.seed
    if num_draft_tokens is not None:
        request.num_draft_tokens.extend(int(d) for d in num_draft_tokens)


# -- response decoders -----------------------------------------------------------------------------
def _model_info(msg: pb.ModelInfo) -> ModelInfo:
    loaded_at = None
    if msg.HasField("loaded_at") and (msg.loaded_at.seconds or msg.loaded_at.nanos):
        loaded_at = msg.loaded_at.ToDatetime(tzinfo=dt.timezone.utc)
    return ModelInfo(
        id=msg.id,
        architecture=msg.architecture,
        model_dir=msg.model_dir,
        device=msg.device,
        dtype=msg.dtype,
        state=pb.ModelState.Name(msg.state),
        num_parameters=msg.num_parameters,
        weight_bytes=msg.weight_bytes,
        kv_cache_bytes=msg.kv_cache_bytes,
        vocab_size=msg.vocab_size,
        hidden_size=msg.hidden_size,
        num_layers=msg.num_layers,
        num_attention_heads=msg.num_attention_heads,
        num_kv_heads=msg.num_kv_heads,
        head_dim=msg.head_dim,
        max_position_embeddings=msg.max_position_embeddings,
        sliding_window=msg.sliding_window,
        kv_block_size=msg.kv_block_size,
        kv_num_blocks=msg.kv_num_blocks,
        max_seq_len=msg.max_seq_len,
        max_batch_size=msg.max_batch_size,
        attention_backend=msg.attention_backend,
        is_quant_model=msg.is_quant_model,
        load_seconds=msg.load_seconds,
        loaded_at=loaded_at,
        load_mode=msg.load_mode,
        mapped_weight_bytes=msg.mapped_weight_bytes,
        weights_version=msg.weights_version,
        released=tuple(msg.released),
        quantization=msg.quantization,
        compile_seconds=msg.compile_seconds,
        cpu_gemm=msg.cpu_gemm,
    )


def _forward_result(msg: pb.ForwardResponse | pb.ForwardPagedResponse, as_torch: bool) -> ForwardResult:
    has_logits = msg.HasField("logits")
    return ForwardResult(
        logits=decode_tensor(msg.logits, as_torch=as_torch) if has_logits else None,
        logits_dtype=pb.DType.Name(msg.logits.dtype).lower() if has_logits else "",
        next_token_ids=list(msg.next_token_ids),
        top_k=[TopK(list(t.token_ids), list(t.logprobs)) for t in msg.top_k],
        compute_seconds=msg.compute_seconds,
        weights_version=msg.weights_version,
        outputs=[
            SequenceOutput(
                list(o.token_ids),
                o.num_accepted_drafts,
                [
                    TokenLogprob(
                        lp.token_id, lp.logprob, lp.rank, list(lp.top_token_ids), list(lp.top_logprobs)
                    )
                    for lp in o.logprobs
                ],
            )
            for o in msg.outputs
        ],
    )


def _worker_info(msg: pb.InfoResponse) -> WorkerInfo:
    return WorkerInfo(
        version=msg.version,
        devices=[
            DeviceInfo(d.name, d.description, d.total_memory_bytes, d.free_memory_bytes) for d in msg.devices
        ],
        default_device=msg.default_device,
        default_dtype=msg.default_dtype,
        attention_backends=list(msg.attention_backends),
        limits=Limits(
            msg.limits.max_message_bytes, msg.limits.max_tokens_per_request, msg.limits.max_batch_size
        ),
        model_roots=list(msg.model_roots),
        architectures=list(msg.architectures),
    )


def _kv_slice(msg: pb.SliceKvCacheResponse, as_torch: bool) -> KvSlice:
    return KvSlice(decode_tensor(msg.key, as_torch=as_torch), decode_tensor(msg.value, as_torch=as_torch))


def _health_status(msg: health_pb2.HealthCheckResponse) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(msg.status)


# -- channel set-up shared by both clients ---------------------------------------------------------
class _ClientBase:
    def __init__(
        self,
        address: str,
        *,
        timeout: float | None,
        auth_token: str | None,
        tls: TlsConfig | bool | None,
        max_message_bytes: int,
        metadata: Sequence[tuple[str, str]],
    ) -> None:
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds or None, got {timeout}")
        self.address = address
        self.default_timeout = timeout
        self.max_message_bytes = max_message_bytes
        self._worker_message_bytes: int | None = None  # read from Info by the first KV import
        md = list(metadata)
        if auth_token:
            md.append(("authorization", f"Bearer {auth_token}"))
        self._metadata: tuple[tuple[str, str], ...] = tuple(md)
        self._tls = TlsConfig() if tls is True else (tls or None)
        self._options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", min(max_message_bytes + _RESPONSE_HEADROOM, 2**31 - 1)),
        ]
        if self._tls is not None and self._tls.server_name:
            self._options.append(("grpc.ssl_target_name_override", self._tls.server_name))

    def _timeout(self, timeout: float | None) -> float | None:
        return self.default_timeout if timeout is None else timeout


# -- the blocking client ---------------------------------------------------------------------------
class ModelWorkerClient(WeightsClientMethods, _ClientBase):
    """A blocking client of one worker.

    `timeout`: the default deadline of every call in seconds (None: no deadline); each method's
    `timeout` overrides it for that call. `auth_token` is sent as `authorization: Bearer <token>`.
    `tls`: None/False for plaintext, True for TLS with the system roots, or a `TlsConfig` (custom
    roots, client certificate for mutual TLS). `metadata` is sent with every call.
    """

    def __init__(
        self,
        address: str,
        *,
        timeout: float | None = None,
        auth_token: str | None = None,
        tls: TlsConfig | bool | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(
            address,
            timeout=timeout,
            auth_token=auth_token,
            tls=tls,
            max_message_bytes=max_message_bytes,
            metadata=metadata,
        )
        if self._tls is None:
            self._channel = grpc.insecure_channel(address, options=self._options)
        else:
            self._channel = grpc.secure_channel(address, self._tls.credentials(), options=self._options)
        self._stub = pb_grpc.ModelWorkerStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _call(self, method: str, stub: Any, request: Any, timeout: float | None) -> Any:
        try:
            return getattr(stub, method)(request, timeout=self._timeout(timeout), metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _error_from_rpc(exc, method) from None

    def load(
        self,
        model_id: str,
        model_dir: str | Path,
        *,
        architecture: str = "",
        is_quant_model: bool = False,
        dtype: str = "",
        device: str = "",
        kv_cache: KvCacheConfig | None = None,
        attention_backend: str = "",
        timeout: float | None = None,
        quantization: str = "",
        compile_decode: bool = False,
        cpu_gemm: str = "",
    ) -> LoadResult:
        """Load `model_dir` (inside a model root of the worker) as `model_id`. Empty strings and a
        zero KvCacheConfig mean the worker's defaults. The same spec again returns already_loaded."""
        request = _load_request(
            model_id,
            model_dir,
            architecture,
            is_quant_model,
            dtype,
            device,
            kv_cache,
            attention_backend,
            quantization,
            compile_decode,
            cpu_gemm,
        )
        response = self._call("Load", self._stub, request, timeout)
        return LoadResult(_model_info(response.model), response.already_loaded)

    def unload(self, model_id: str, *, timeout: float | None = None) -> UnloadResult:
        response = self._call("Unload", self._stub, pb.UnloadRequest(model_id=model_id), timeout)
        return UnloadResult(response.unload_seconds, response.freed_bytes)

    def forward(
        self,
        model_id: str,
        token_ids: TokenIds,
        *,
        positions: TokenIds | None = None,
        use_cache: bool = False,
        start_pos: int = 0,
        logits_mode: LogitsMode = "last",
        logits_dtype: LogitsDType = "float32",
        top_k: int = 0,
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        logprobs_mode: Literal["raw", "processed"] = "raw",
        as_torch: bool = False,
        timeout: float | None = None,
    ) -> ForwardResult:
        """A forward pass without paging. `token_ids`: one sequence (1-D) or equal-length rows (2-D).
        use_cache=False is stateless; use_cache=True writes the contiguous cache rows at start_pos.
        `sampling`: one SamplingParams for every row or one per row (None: argmax)."""
        request = _forward_request(
            model_id, token_ids, positions, use_cache, start_pos, logits_mode, logits_dtype, top_k
        )
        _add_sampling(request, sampling, logprobs_mode)
        return _forward_result(self._call("Forward", self._stub, request, timeout), as_torch)

    def forward_paged(
        self,
        model_id: str,
        input_tokens: TokenIds,
        positions: TokenIds,
        block_tables: Sequence[Sequence[int]],
        slot_mapping: TokenIds,
        context_lens: Sequence[int],
        *,
        is_prefill: bool,
        query_lens: Sequence[int] | None = None,
        logits_mode: LogitsMode = "last",
        logits_dtype: LogitsDType = "float32",
        top_k: int = 0,
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        logprobs_mode: Literal["raw", "processed"] = "raw",
        num_draft_tokens: Sequence[int] | None = None,
        as_torch: bool = False,
        timeout: float | None = None,
    ) -> ForwardResult:
        """A forward pass over the paged KV cache (see README "Driving the worker from a scheduler").
        `sampling`: one SamplingParams for every sequence or one per sequence (None: argmax);
        `num_draft_tokens`: per sequence, how many of its last query tokens are drafts to verify."""
        request = _forward_paged_request(
            model_id,
            input_tokens,
            positions,
            block_tables,
            slot_mapping,
            context_lens,
            is_prefill,
            query_lens,
            logits_mode,
            logits_dtype,
            top_k,
        )
        _add_sampling(request, sampling, logprobs_mode, num_draft_tokens)
        return _forward_result(self._call("ForwardPaged", self._stub, request, timeout), as_torch)

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        response = self._call("ListModels", self._stub, pb.ListModelsRequest(), timeout)
        return [_model_info(m) for m in response.models]

    def list_architectures(self, *, timeout: float | None = None) -> list[str]:
        response = self._call("ListArchitectures", self._stub, pb.ListArchitecturesRequest(), timeout)
        return list(response.architectures)

    def reset_cache(self, model_id: str, *, timeout: float | None = None) -> None:
        self._call("ResetCache", self._stub, pb.ResetCacheRequest(model_id=model_id), timeout)

    def slice_kv_cache(
        self,
        model_id: str,
        layer_idx: int,
        start_pos: int,
        length: int,
        *,
        as_torch: bool = False,
        timeout: float | None = None,
    ) -> KvSlice:
        request = pb.SliceKvCacheRequest(
            model_id=model_id, layer_idx=layer_idx, start_pos=start_pos, length=length
        )
        return _kv_slice(self._call("SliceKvCache", self._stub, request, timeout), as_torch)

    def export_kv_blocks(
        self, model_id: str, block_ids: Sequence[int], *, timeout: float | None = None
    ) -> KvBlocks:
        """Every layer's K and V of the paged blocks `block_ids` (distinct), in that order."""
        request = pb.ExportKvBlocksRequest(
            model_id=model_id, block_ids=_int32_list(_int_array(block_ids, "block_ids"), "block_ids")
        )
        collector = _KvCollector(list(request.block_ids))
        try:
            for chunk in self._stub.ExportKvBlocks(
                request, timeout=self._timeout(timeout), metadata=self._metadata
            ):
                collector.add(chunk)
        except grpc.RpcError as exc:
            raise _error_from_rpc(exc, "ExportKvBlocks") from None
        return collector.result()

    def import_kv_blocks(
        self,
        model_id: str,
        dst_block_ids: Sequence[int],
        blocks: KvBlocks,
        *,
        chunk_bytes: int = KV_CHUNK_BYTES,
        timeout: float | None = None,
    ) -> KvImportResult:
        """Write exported blocks into `dst_block_ids` (one per block, distinct), streamed in chunks of
        at most `chunk_bytes` payload. The worker writes nothing unless the whole stream is valid."""
        if self._worker_message_bytes is None:  # the worker's cap bounds every chunk too
            self._worker_message_bytes = self.info(timeout=timeout).limits.max_message_bytes
        size = _kv_chunk_size(chunk_bytes, self.max_message_bytes, self._worker_message_bytes, blocks)
        chunks = _kv_chunks(model_id, dst_block_ids, blocks, size)
        response = self._call("ImportKvBlocks", self._stub, chunks, timeout)
        return KvImportResult(response.blocks, response.bytes)

    def copy_kv_blocks(
        self,
        model_id: str,
        block_ids: Sequence[int],
        dst: ModelWorkerClient,
        dst_model_id: str,
        dst_block_ids: Sequence[int],
        *,
        timeout: float | None = None,
    ) -> KvImportResult:
        """Export blocks from this worker straight into another one: each chunk is passed on as it
        arrives, nothing is assembled here (the export's chunks must fit the destination's cap)."""
        request = pb.ExportKvBlocksRequest(
            model_id=model_id, block_ids=_int32_list(_int_array(block_ids, "block_ids"), "block_ids")
        )
        relay = _KvRelay(dst_model_id, dst_block_ids)
        stream = self._stub.ExportKvBlocks(request, timeout=self._timeout(timeout), metadata=self._metadata)

        def chunks() -> Iterator[pb.KvBlocksChunk]:
            try:
                for i, chunk in enumerate(stream):
                    yield relay.first(chunk) if i == 0 else chunk
            except grpc.RpcError as exc:
                relay.failed(exc)

        try:
            response = dst._call("ImportKvBlocks", dst._stub, chunks(), timeout)
        except ModelWorkerClientError:
            if relay.error is not None:
                raise relay.error from None
            raise
        finally:
            stream.cancel()  # the import may have been refused before the export ended
        return KvImportResult(response.blocks, response.bytes)

    def info(self, *, timeout: float | None = None) -> WorkerInfo:
        return _worker_info(self._call("Info", self._stub, pb.InfoRequest(), timeout))

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The grpc.health.v1 status of `service` ("" = the whole worker): "SERVING", "NOT_SERVING"."""
        request = health_pb2.HealthCheckRequest(service=service)
        return _health_status(self._call("Check", self._health, request, timeout))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ModelWorkerClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# -- the asyncio client ----------------------------------------------------------------------------
class AsyncModelWorkerClient(AsyncWeightsClientMethods, _ClientBase):
    """The asyncio twin of `ModelWorkerClient`: the same methods and arguments, awaited. Create and
    use it inside one running event loop; `await client.close()` or `async with`."""

    def __init__(
        self,
        address: str,
        *,
        timeout: float | None = None,
        auth_token: str | None = None,
        tls: TlsConfig | bool | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(
            address,
            timeout=timeout,
            auth_token=auth_token,
            tls=tls,
            max_message_bytes=max_message_bytes,
            metadata=metadata,
        )
        if self._tls is None:
            self._channel = grpc.aio.insecure_channel(address, options=self._options)
        else:
            self._channel = grpc.aio.secure_channel(address, self._tls.credentials(), options=self._options)
        self._stub = pb_grpc.ModelWorkerStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def _call(self, method: str, stub: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await getattr(stub, method)(
                request, timeout=self._timeout(timeout), metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise _error_from_rpc(exc, method) from None

    async def load(
        self,
        model_id: str,
        model_dir: str | Path,
        *,
        architecture: str = "",
        is_quant_model: bool = False,
        dtype: str = "",
        device: str = "",
        kv_cache: KvCacheConfig | None = None,
        attention_backend: str = "",
        timeout: float | None = None,
        quantization: str = "",
        compile_decode: bool = False,
        cpu_gemm: str = "",
    ) -> LoadResult:
        request = _load_request(
            model_id,
            model_dir,
            architecture,
            is_quant_model,
            dtype,
            device,
            kv_cache,
            attention_backend,
            quantization,
            compile_decode,
            cpu_gemm,
        )
        response = await self._call("Load", self._stub, request, timeout)
        return LoadResult(_model_info(response.model), response.already_loaded)

    async def unload(self, model_id: str, *, timeout: float | None = None) -> UnloadResult:
        response = await self._call("Unload", self._stub, pb.UnloadRequest(model_id=model_id), timeout)
        return UnloadResult(response.unload_seconds, response.freed_bytes)

    async def forward(
        self,
        model_id: str,
        token_ids: TokenIds,
        *,
        positions: TokenIds | None = None,
        use_cache: bool = False,
        start_pos: int = 0,
        logits_mode: LogitsMode = "last",
        logits_dtype: LogitsDType = "float32",
        top_k: int = 0,
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        logprobs_mode: Literal["raw", "processed"] = "raw",
        as_torch: bool = False,
        timeout: float | None = None,
    ) -> ForwardResult:
        request = _forward_request(
            model_id, token_ids, positions, use_cache, start_pos, logits_mode, logits_dtype, top_k
        )
        _add_sampling(request, sampling, logprobs_mode)
        return _forward_result(await self._call("Forward", self._stub, request, timeout), as_torch)

    async def forward_paged(
        self,
        model_id: str,
        input_tokens: TokenIds,
        positions: TokenIds,
        block_tables: Sequence[Sequence[int]],
        slot_mapping: TokenIds,
        context_lens: Sequence[int],
        *,
        is_prefill: bool,
        query_lens: Sequence[int] | None = None,
        logits_mode: LogitsMode = "last",
        logits_dtype: LogitsDType = "float32",
        top_k: int = 0,
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        logprobs_mode: Literal["raw", "processed"] = "raw",
        num_draft_tokens: Sequence[int] | None = None,
        as_torch: bool = False,
        timeout: float | None = None,
    ) -> ForwardResult:
        request = _forward_paged_request(
            model_id,
            input_tokens,
            positions,
            block_tables,
            slot_mapping,
            context_lens,
            is_prefill,
            query_lens,
            logits_mode,
            logits_dtype,
            top_k,
        )
        _add_sampling(request, sampling, logprobs_mode, num_draft_tokens)
        return _forward_result(await self._call("ForwardPaged", self._stub, request, timeout), as_torch)

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        response = await self._call("ListModels", self._stub, pb.ListModelsRequest(), timeout)
        return [_model_info(m) for m in response.models]

    async def list_architectures(self, *, timeout: float | None = None) -> list[str]:
        response = await self._call("ListArchitectures", self._stub, pb.ListArchitecturesRequest(), timeout)
        return list(response.architectures)

    async def reset_cache(self, model_id: str, *, timeout: float | None = None) -> None:
        await self._call("ResetCache", self._stub, pb.ResetCacheRequest(model_id=model_id), timeout)

    async def slice_kv_cache(
        self,
        model_id: str,
        layer_idx: int,
        start_pos: int,
        length: int,
        *,
        as_torch: bool = False,
        timeout: float | None = None,
    ) -> KvSlice:
        request = pb.SliceKvCacheRequest(
            model_id=model_id, layer_idx=layer_idx, start_pos=start_pos, length=length
        )
        return _kv_slice(await self._call("SliceKvCache", self._stub, request, timeout), as_torch)

    async def export_kv_blocks(
        self, model_id: str, block_ids: Sequence[int], *, timeout: float | None = None
    ) -> KvBlocks:
        request = pb.ExportKvBlocksRequest(
            model_id=model_id, block_ids=_int32_list(_int_array(block_ids, "block_ids"), "block_ids")
        )
        collector = _KvCollector(list(request.block_ids))
        try:
            async for chunk in self._stub.ExportKvBlocks(
                request, timeout=self._timeout(timeout), metadata=self._metadata
            ):
                collector.add(chunk)
        except grpc.RpcError as exc:
            raise _error_from_rpc(exc, "ExportKvBlocks") from None
        return collector.result()

    async def import_kv_blocks(
        self,
        model_id: str,
        dst_block_ids: Sequence[int],
        blocks: KvBlocks,
        *,
        chunk_bytes: int = KV_CHUNK_BYTES,
        timeout: float | None = None,
    ) -> KvImportResult:
        if self._worker_message_bytes is None:
            self._worker_message_bytes = (await self.info(timeout=timeout)).limits.max_message_bytes
        size = _kv_chunk_size(chunk_bytes, self.max_message_bytes, self._worker_message_bytes, blocks)
        chunks = _kv_chunks(model_id, dst_block_ids, blocks, size)
        response = await self._call("ImportKvBlocks", self._stub, chunks, timeout)
        return KvImportResult(response.blocks, response.bytes)

    async def copy_kv_blocks(
        self,
        model_id: str,
        block_ids: Sequence[int],
        dst: AsyncModelWorkerClient,
        dst_model_id: str,
        dst_block_ids: Sequence[int],
        *,
        timeout: float | None = None,
    ) -> KvImportResult:
        request = pb.ExportKvBlocksRequest(
            model_id=model_id, block_ids=_int32_list(_int_array(block_ids, "block_ids"), "block_ids")
        )
        relay = _KvRelay(dst_model_id, dst_block_ids)
        stream = self._stub.ExportKvBlocks(request, timeout=self._timeout(timeout), metadata=self._metadata)

        async def chunks() -> AsyncIterator[pb.KvBlocksChunk]:
            try:
                i = 0
                async for chunk in stream:
                    yield relay.first(chunk) if i == 0 else chunk
                    i += 1
            except grpc.RpcError as exc:
                relay.failed(exc)

        try:
            response = await dst._call("ImportKvBlocks", dst._stub, chunks(), timeout)
        except ModelWorkerClientError:
            if relay.error is not None:
                raise relay.error from None
            raise
        finally:
            stream.cancel()
        return KvImportResult(response.blocks, response.bytes)

    async def info(self, *, timeout: float | None = None) -> WorkerInfo:
        return _worker_info(await self._call("Info", self._stub, pb.InfoRequest(), timeout))

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        request = health_pb2.HealthCheckRequest(service=service)
        return _health_status(await self._call("Check", self._health, request, timeout))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncModelWorkerClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
