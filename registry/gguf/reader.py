"""Reading GGUF files through the `gguf` package (an optional dependency, imported on first use):
the header and metadata, checked, and each tensor's values dequantized to float32."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ..errors import InvalidArgument


class GgufImportError(InvalidArgument):
    """The GGUF file cannot be imported (unreadable, unsupported, inconsistent), or the output
    directory cannot be written. The message names the file and what is wrong."""


def require_gguf() -> ModuleType:
    """The `gguf` package, imported on first use so that the runtime does not need it."""
    try:
        import gguf
    except ImportError:
        raise GgufImportError(
            "reading GGUF files needs the 'gguf' package: pip install 'modelworker[gguf]'"
        ) from None
    return gguf


@dataclass
class GgufTensor:
    name: str
    type_name: str  # ggml type, e.g. "Q4_1"
    shape: tuple[int, ...]  # numpy (row-major) order: ggml's ne reversed
    raw: Any  # the reader's tensor (memory-mapped data)


@dataclass
class GgufFile:
    path: Path
    architecture: str
    metadata: dict[str, Any]
    tensors: dict[str, GgufTensor]

    def key(self, name: str, default: Any = None, *, required: bool = False) -> Any:
        """`{architecture}.{name}` from the metadata."""
        full = f"{self.architecture}.{name}"
        if full in self.metadata:
            return self.metadata[full]
        if required:
            raise GgufImportError(f"{self.path}: metadata key {full!r} is missing")
        return default


def _field_value(field: Any, types: Any) -> Any:
    """Decode one metadata field of gguf's reader (scalars, strings, arrays of either)."""
    vtype = types.GGUFValueType
    kinds = list(field.types)
    if not kinds:
        return None
    if kinds[0] == vtype.ARRAY:
        if len(kinds) > 1 and kinds[1] == vtype.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        if len(kinds) > 1 and kinds[1] == vtype.ARRAY:
            return None  # nested arrays: nothing we read uses them
        return [field.parts[i].tolist()[0] for i in field.data]
    if kinds[0] == vtype.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    value = field.parts[field.data[0]].tolist()[0]
    return bool(value) if kinds[0] == vtype.BOOL else value


def read_gguf(path: Path) -> GgufFile:
    """Open and check a GGUF file: magic, header, metadata, and that every tensor lies inside it."""
    gguf = require_gguf()
    path = Path(path)
    if not path.exists():
        raise GgufImportError(f"{path}: no such file")
    if not path.is_file():
        raise GgufImportError(f"{path}: not a regular file")
    size = path.stat().st_size
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GgufImportError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # the reader fails with IndexError/ValueError on short or corrupt files
        raise GgufImportError(
            f"{path}: the GGUF file is truncated or corrupt ({size} bytes; the gguf reader says: {exc})"
        ) from None
    if getattr(reader, "byte_order", "I") == "S":
        raise GgufImportError(f"{path}: big-endian GGUF files are not supported")
    metadata = {name: _field_value(field, gguf) for name, field in reader.fields.items()}
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise GgufImportError(f"{path}: metadata key 'general.architecture' is missing")
    tensors: dict[str, GgufTensor] = {}
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise GgufImportError(
                f"{path}: tensor {t.name!r} ends at byte {end} but the file has {size} (truncated)"
            )
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        tensors[t.name] = GgufTensor(t.name, t.tensor_type.name, shape, t)
    return GgufFile(path, arch, metadata, tensors)


_DEQUANT_SUPPORT: dict[str, bool] = {}


def can_dequantize(type_name: str) -> bool:
    """Whether gguf.quants.dequantize handles this type (probed once on a zero block)."""
    if type_name in ("F32", "F16", "BF16", "F64"):
        return True
    if type_name not in _DEQUANT_SUPPORT:
        gguf = require_gguf()
        qtype = gguf.GGMLQuantizationType[type_name]
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        try:
            gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
            ok = True
        except (NotImplementedError, ValueError, KeyError):
            ok = False
        ok = ok and block_size > 1  # integer types (I8..I64) are not weights
        _DEQUANT_SUPPORT[type_name] = ok
    return _DEQUANT_SUPPORT[type_name]


def dequantize(gf: GgufFile, tensor: GgufTensor) -> np.ndarray:
    """float32 values in numpy order (rows, columns)."""
    gguf = require_gguf()
    data = tensor.raw.data
    if tensor.type_name == "F64":
        values = np.asarray(data, dtype=np.float64).astype(np.float32)
    else:
        try:
            values = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[tensor.type_name])
        except (NotImplementedError, ValueError) as exc:
            raise GgufImportError(f"{gf.path}: tensor {tensor.name!r} ({tensor.type_name}): {exc}") from None
    values = np.asarray(values, dtype=np.float32)
    if not values.flags.writeable:  # F32 data is a view of the read-only memory map
        values = values.copy()
    if values.size != math.prod(tensor.shape):
        raise GgufImportError(
            f"{gf.path}: tensor {tensor.name!r} ({tensor.type_name}) dequantized to {values.size} values, "
            f"expected {math.prod(tensor.shape)}"
        )
    return values.reshape(tensor.shape)
