"""torch ↔ the proto's `Tensor` (raw little-endian bytes), dtype and logits-mode enums, top-k."""

from __future__ import annotations

import sys

import numpy as np
import torch

from registry.errors import InvalidArgument

from .pb.modelworker.v1 import worker_pb2 as pb

TORCH_TO_ENUM: dict[torch.dtype, int] = {
    torch.float32: pb.FLOAT32,
    torch.float16: pb.FLOAT16,
    torch.bfloat16: pb.BFLOAT16,
    torch.int32: pb.INT32,
    torch.int64: pb.INT64,
}
ENUM_TO_TORCH: dict[int, torch.dtype] = {v: k for k, v in TORCH_TO_ENUM.items()}
LOGITS_DTYPES: dict[int, torch.dtype] = {
    pb.DTYPE_UNSPECIFIED: torch.float32,
    pb.FLOAT32: torch.float32,
    pb.FLOAT16: torch.float16,
    pb.BFLOAT16: torch.bfloat16,
}
LOGITS_MODES = frozenset(pb.LogitsMode.values())

# numpy has no bfloat16: its bytes travel through a same-width integer view.
_NUMPY_VIEW: dict[torch.dtype, torch.dtype] = {torch.bfloat16: torch.int16}
_LITTLE = sys.byteorder == "little"


def logits_dtype(value: int, field: str = "logits_dtype") -> torch.dtype:
    """The torch dtype a request's logits_dtype asks for; only floating types are valid."""
    if value in LOGITS_DTYPES:
        return LOGITS_DTYPES[value]
    if value in ENUM_TO_TORCH:
        raise InvalidArgument(
            f"{field} {pb.DType.Name(value)} is not a logits type (use FLOAT32, FLOAT16 or BFLOAT16)"
        )
    raise InvalidArgument(f"{field} {value} is not a DType value")


def logits_mode(value: int, field: str = "logits_mode") -> int:
    if value not in LOGITS_MODES:
        raise InvalidArgument(
            f"{field} {value} is not a LogitsMode value (LOGITS_LAST, LOGITS_ALL, LOGITS_NONE)"
        )
    return value


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Row-major little-endian bytes of `t` (copied to CPU)."""
    t = t.detach().contiguous().cpu()
    array = t.view(_NUMPY_VIEW.get(t.dtype, t.dtype)).numpy()
    if not _LITTLE:  # pragma: no cover - big-endian hosts only
        array = array.byteswap()
    return array.tobytes()


def encode_tensor(t: torch.Tensor, out: pb.Tensor | None = None) -> pb.Tensor:
    if t.dtype not in TORCH_TO_ENUM:
        raise TypeError(f"no DType for {t.dtype}")
    out = out if out is not None else pb.Tensor()
    out.dtype = TORCH_TO_ENUM[t.dtype]
    out.shape[:] = list(t.shape)
    out.data = tensor_bytes(t)
    return out


def decode_tensor(msg: pb.Tensor) -> torch.Tensor:
    """A CPU tensor from a Tensor message (the client side; also used by the tests)."""
    if msg.dtype not in ENUM_TO_TORCH:
        raise InvalidArgument(f"tensor dtype {msg.dtype} is not a DType value")
    dtype = ENUM_TO_TORCH[msg.dtype]
    shape = tuple(int(d) for d in msg.shape)
    numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if len(msg.data) != numel * dtype.itemsize:
        raise InvalidArgument(
            f"tensor of shape {list(shape)} and dtype {pb.DType.Name(msg.dtype)} needs "
            f"{numel * dtype.itemsize} bytes, got {len(msg.data)}"
        )
    view = _NUMPY_VIEW.get(dtype, dtype)
    array = np.frombuffer(msg.data, dtype=torch.empty((), dtype=view).numpy().dtype.newbyteorder("<"))
    return torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=True)).view(dtype).reshape(shape)


def top_k(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best-first top-k of each row of float32 logits [rows, vocab]: (ids int64, logprobs float32)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    values, ids = torch.topk(logprobs, k, dim=-1)
    return ids, values


def fill_top_k(out: list[pb.TopK] | object, ids: torch.Tensor, logprobs: torch.Tensor) -> None:
    """Append one TopK per row to a repeated TopK field."""
    for row_ids, row_lp in zip(ids.tolist(), logprobs.tolist(), strict=True):
        out.add(token_ids=row_ids, logprobs=row_lp)  # type: ignore[attr-defined]


def logits_response_bytes(
    rows: int, vocab: int, dtype: torch.dtype, k: int, k_rows: int, sequences: int
) -> int:
    """An upper bound of a forward response's encoded size, checked before any work is done:
    `rows` logits rows, top-k for `k_rows` rows, one next-token id per sequence."""
    logits = rows * vocab * dtype.itemsize
    # Each top-k entry: at most 5 bytes of varint id + 4 bytes of float, plus per-row framing.
    top = k_rows * (k * 9 + 16) if k else 0
    return logits + top + sequences * 5 + 1024
