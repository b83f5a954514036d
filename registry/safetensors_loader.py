"""Strict safetensors loading straight into a module's parameters.

Headers are parsed and checked by us before any tensor byte is read (truncated files, offsets past
the end, sizes that disagree with shapes, absurd header lengths), then every tensor is copied from a
memory map into its parameter — already on the target device and dtype — one tensor at a time, so no
second full copy of the checkpoint ever exists. Pickle checkpoints are refused, never opened.
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import CorruptCheckpoint, InvalidArgument, UnsafeCheckpoint, WeightsMismatch
from .weights import WeightMapping

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory (sharded through the index, or single)."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptCheckpoint(f"{index}: not a valid safetensors index ({exc})") from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (model_dir / s).is_file()]
        if missing:
            raise CorruptCheckpoint(f"{index}: shard file(s) named in the index are missing: {', '.join(missing)}")
        for shard in shards:
            if Path(shard).is_absolute() or ".." in Path(shard).parts:
                raise CorruptCheckpoint(f"{index}: shard name {shard!r} must be a file in the model directory")
        return [model_dir / s for s in shards]
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    found = sorted(model_dir.glob("*.safetensors"))
    if found:
        return found
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeCheckpoint(
            f"{model_dir}: only pickle checkpoints found ({', '.join(pickles)}); they can run code when "
            "loaded and are refused. Convert them to safetensors."
        )
    raise InvalidArgument(f"{model_dir}: no safetensors weights found ({SINGLE_FILE} or {INDEX_FILE})")


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse and check one safetensors header without reading tensor data."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptCheckpoint(f"{path}: truncated (file is {size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise CorruptCheckpoint(
                f"{path}: header length {header_len} is impossible for a file of {size} bytes (truncated or not safetensors)"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptCheckpoint(f"{path}: header is not valid JSON ({exc})") from None
    data_start = 8 + header_len
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpoint(f"{path}: tensor {name!r} has a malformed header entry ({exc!r})") from None
        numel = 1
        for d in shape:
            if d < 0:
                raise CorruptCheckpoint(f"{path}: tensor {name!r} has a negative dimension {shape}")
            numel *= d
        nbytes = numel * dtype.itemsize
        if begin < 0 or end < begin or end - begin != nbytes:
            raise CorruptCheckpoint(
                f"{path}: tensor {name!r} claims {end - begin} bytes at [{begin}, {end}) but shape {list(shape)} "
                f"of {info['dtype']} needs {nbytes}"
            )
        if data_start + end > size:
            raise CorruptCheckpoint(
                f"{path}: tensor {name!r} ends at byte {data_start + end} but the file has {size} (truncated)"
            )
        entries[name] = TensorEntry(name, path, dtype, shape, data_start + begin, nbytes)
    return entries


def index_checkpoint(model_dir: Path) -> dict[str, TensorEntry]:
    """Every tensor of the checkpoint by name, checked for duplicates across shards."""
    entries: dict[str, TensorEntry] = {}
    for path in checkpoint_files(model_dir):
        for name, entry in read_header(path).items():
            if name in entries:
                raise CorruptCheckpoint(f"{model_dir}: tensor {name!r} appears in both {entries[name].file.name} and {path.name}")
            entries[name] = entry
    return entries


def estimate_weight_bytes(model_dir: Path, dtype: torch.dtype | None) -> int:
    """Bytes the weights will take once loaded in `dtype` (floating tensors convert, others keep theirs)."""
    total = 0
    for entry in index_checkpoint(model_dir).values():
        itemsize = dtype.itemsize if dtype is not None and entry.dtype.is_floating_point else entry.dtype.itemsize
        total += entry.numel * itemsize
    return total


def _parameter_slots(module: nn.Module) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Parameters by name, and the names that alias an earlier parameter (tied weights)."""
    params: dict[str, torch.Tensor] = {}
    aliases: set[str] = set()
    seen: set[int] = set()
    for name, p in module.named_parameters(remove_duplicate=False):
        params[name] = p
        if id(p) in seen:
            aliases.add(name)
        seen.add(id(p))
    return params, aliases


def _shard_sizes(module: nn.Module, param_name: str) -> tuple[int, ...]:
    owner = module.get_submodule(param_name.rsplit(".", 1)[0]) if "." in param_name else module
    sizes = getattr(owner, "shard_sizes", None)
    if sizes is None:
        raise InvalidArgument(f"parameter {param_name} is not a fused projection")
    return tuple(sizes)


def plan_load(
    module: nn.Module, entries: dict[str, TensorEntry], mapping: WeightMapping, where: str = ""
) -> list[tuple[TensorEntry, str, int | None]]:
    """Match every checkpoint tensor to its destination; raise one error listing every problem."""
    params, aliases = _parameter_slots(module)
    required: set[tuple[str, int | None]] = set()
    for name in params:
        if name in aliases:
            continue
        owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
        sizes = getattr(owner, "shard_sizes", None)
        if sizes is None:
            required.add((name, None))
        else:
            required.update((name, i) for i in range(len(sizes)))
    plan: list[tuple[TensorEntry, str, int | None]] = []
    provided: dict[tuple[str, int | None], str] = {}
    unexpected: list[str] = []
    mismatched: list[str] = []
    for entry in sorted(entries.values(), key=lambda e: e.name):
        mapped = mapping.map(entry.name)
        if mapped is None:
            continue
        param_name, shard = mapped
        if param_name in aliases:
            continue  # tied: the source parameter is loaded under its own name
        if param_name not in params or (param_name, shard) not in required:
            unexpected.append(entry.name)
            continue
        key = (param_name, shard)
        if key in provided:
            mismatched.append(f"{entry.name} fills {param_name} already filled by {provided[key]}")
            continue
        provided[key] = entry.name
        param = params[param_name]
        expected = tuple(param.shape)
        if shard is not None:
            expected = (_shard_sizes(module, param_name)[shard],) + expected[1:]
        if entry.shape != expected:
            mismatched.append(f"{entry.name} is {list(entry.shape)}, expected {list(expected)}")
            continue
        if not (entry.dtype.is_floating_point and param.dtype.is_floating_point) and entry.dtype != param.dtype:
            mismatched.append(f"{entry.name} has dtype {entry.dtype}, expected a floating-point tensor")
            continue
        plan.append((entry, param_name, shard))
    missing = sorted(f"{p}" if s is None else f"{p}[shard {s}]" for p, s in required - provided.keys())
    if missing or unexpected or mismatched:
        raise WeightsMismatch(missing=missing, unexpected=unexpected, mismatched=mismatched, where=where)
    return plan


def _read_into(target: torch.Tensor, entry: TensorEntry, mm: mmap.mmap) -> None:
    if entry.numel == 0:
        return
    source = torch.frombuffer(mm, dtype=entry.dtype, count=entry.numel, offset=entry.offset).view(entry.shape)
    target.copy_(source)  # converts dtype and moves to the target device in one step
    del source


@torch.no_grad()
def load_weights(module: nn.Module, model_dir: Path, mapping: WeightMapping) -> int:
    """Load every weight of `model_dir` into `module` strictly; returns the bytes read."""
    entries = index_checkpoint(model_dir)
    plan = plan_load(module, entries, mapping, where=str(model_dir))
    params, _ = _parameter_slots(module)
    by_file: dict[Path, list[tuple[TensorEntry, str, int | None]]] = {}
    for item in plan:
        by_file.setdefault(item[0].file, []).append(item)
    total = 0
    for path, items in by_file.items():
        with path.open("rb") as f:
            # ACCESS_COPY gives a writable (copy-on-write) view, which torch.frombuffer wants; nothing
            # is ever written, so no page is copied.
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        try:
            for entry, param_name, shard in sorted(items, key=lambda it: it[0].offset):
                target = params[param_name]
                if shard is not None:
                    sizes = _shard_sizes(module, param_name)
                    target = target.narrow(0, sum(sizes[:shard]), sizes[shard])
                _read_into(target, entry, mm)
                total += entry.nbytes
        finally:
            try:
                mm.close()
            except BufferError:  # a view still alive somewhere; the map closes when it dies
                pass
    return total
