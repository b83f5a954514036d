"""Strict safetensors loading straight into a module's parameters.

Headers are parsed and checked by us before any tensor byte is read (truncated files, offsets past
the end, sizes that disagree with shapes, absurd header lengths), then every tensor is read into its
parameter — already on the target device and dtype — one tensor at a time, so no second full copy of
the checkpoint ever exists: with read(2) when the parameter's bytes are the file's bytes (CPU, same
dtype), else copied (and converted) from a memory map. Pickle checkpoints are refused, never opened.
"""

from __future__ import annotations

import json
import mmap
import os
import stat
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, NamedTuple

import torch
from torch import nn

from .errors import CorruptCheckpoint, InvalidArgument, UnsafeCheckpoint, WeightsMismatch
from .parallel import TensorSlice
from .weights import WeightMapping, WeightTarget

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


def _read_index(index: Path) -> dict[str, str]:
    """The index's weight_map (tensor name → shard file), checked before any shard is touched."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except OSError as exc:
        raise InvalidArgument(f"{index}: cannot be read ({exc.strerror or exc})") from None
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise CorruptCheckpoint(f"{index}: not a valid safetensors index ({exc!r})") from None
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise CorruptCheckpoint(f"{index}: weight_map[{name!r}] must be a file name, got {shard!r}")
        # Shards are plain files of the model directory: no sub-directories, no way out of it.
        if shard != Path(shard).name or shard in (".", ".."):
            raise CorruptCheckpoint(f"{index}: shard name {shard!r} must be a file in the model directory")
    return weight_map


def open_regular(path: Path, buffering: int = -1) -> BinaryIO:
    """Open a weights file for reading only if it is a regular file: a FIFO, a device or a socket
    would block the reading thread forever (O_NONBLOCK so the open itself cannot block; the check on
    the open descriptor, so the file cannot be swapped in between)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise InvalidArgument(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise InvalidArgument(
                f"{path}: is not a regular file ({_file_kind(mode)}); weights must be plain files"
            )
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=buffering)
    except BaseException:
        os.close(fd)
        raise


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a directory")):  # fmt: skip
        if test(mode):
            return name
    return "not a plain file"


def _refuse_irregular(paths: list[Path]) -> None:
    """Before anything is opened: every weights file is a regular file (stat follows symlinks)."""
    for path in paths:
        try:
            mode = path.stat().st_mode
        except OSError:
            continue  # reported by the open, with its reason
        if not stat.S_ISREG(mode):
            raise InvalidArgument(
                f"{path}: is not a regular file ({_file_kind(mode)}); weights must be plain files"
            )


def _checkpoint_layout(model_dir: Path) -> tuple[list[Path], dict[str, str] | None]:
    files, weight_map = _find_checkpoint(model_dir)
    _refuse_irregular(files)
    return files, weight_map


def _find_checkpoint(model_dir: Path) -> tuple[list[Path], dict[str, str] | None]:
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = _read_index(index)
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (model_dir / s).exists()]
        if missing:
            raise CorruptCheckpoint(
                f"{index}: shard file(s) named in the index are missing: {', '.join(missing)}"
            )
        return [model_dir / s for s in shards], weight_map
    if (model_dir / SINGLE_FILE).exists():
        return [model_dir / SINGLE_FILE], None
    found = sorted(model_dir.glob("*.safetensors"))
    if found:
        return found, None
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeCheckpoint(
            f"{model_dir}: only pickle checkpoints found ({', '.join(pickles)}); they can run code when "
            "loaded and are refused. Convert them to safetensors."
        )
    raise InvalidArgument(f"{model_dir}: no safetensors weights found ({SINGLE_FILE} or {INDEX_FILE})")


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory (sharded through the index, or single)."""
    return _checkpoint_layout(model_dir)[0]


def _int_list(value: object) -> list[int]:
    # JSON ints only: 2.5, "3" or true in a shape are corruption, not something to coerce.
    if not isinstance(value, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        raise ValueError(f"expected a list of integers, got {value!r}")
    return value


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse and check one safetensors header without reading tensor data."""
    try:
        size = path.stat().st_size
        with open_regular(path) as f:
            head = f.read(8)
            if len(head) < 8:
                raise CorruptCheckpoint(f"{path}: truncated (file is {size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise CorruptCheckpoint(
                    f"{path}: header length {header_len} is impossible for a file of {size} bytes "
                    "(truncated or not safetensors)"
                )
            raw = f.read(header_len)
    except OSError as exc:
        raise InvalidArgument(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CorruptCheckpoint(f"{path}: header is not valid JSON ({exc})") from None
    data_start = 8 + header_len
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            if not isinstance(info, dict):
                raise TypeError("entry is not an object")
            dtype_name = info["dtype"]
            if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
                raise ValueError(f"unsupported dtype {dtype_name!r}")
            dtype = DTYPES[dtype_name]
            shape = tuple(_int_list(info["shape"]))
            offsets = _int_list(info["data_offsets"])
            if len(offsets) != 2:
                raise ValueError(f"data_offsets must be [begin, end], got {offsets}")
            begin, end = offsets
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpoint(
                f"{path}: tensor {name!r} has a malformed header entry ({exc!r})"
            ) from None
        numel = 1
        for d in shape:
            if d < 0:
                raise CorruptCheckpoint(f"{path}: tensor {name!r} has a negative dimension {shape}")
            numel *= d
        nbytes = numel * dtype.itemsize
        if begin < 0 or end < begin or end - begin != nbytes:
            raise CorruptCheckpoint(
                f"{path}: tensor {name!r} claims {end - begin} bytes at [{begin}, {end}) but shape {list(shape)} "
                f"of {dtype_name} needs {nbytes}"
            )
        if data_start + end > size:
            raise CorruptCheckpoint(
                f"{path}: tensor {name!r} ends at byte {data_start + end} but the file has {size} (truncated)"
            )
        entries[name] = TensorEntry(name, path, dtype, shape, data_start + begin, nbytes)
    _refuse_overlaps(path, entries)
    return entries


def _refuse_overlaps(path: Path, entries: dict[str, TensorEntry]) -> None:
    """The format gives each tensor its own bytes of the data section: overlapping ones are refused."""
    spans = sorted((e.offset, e.offset + e.nbytes, e.name) for e in entries.values() if e.nbytes)
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:], strict=False):
        if begin < end:
            raise CorruptCheckpoint(
                f"{path}: tensors {first!r} and {second!r} overlap in the data section "
                f"(bytes [{begin}, {end}) belong to both)"
            )


def index_checkpoint(model_dir: Path) -> dict[str, TensorEntry]:
    """Every tensor of the checkpoint by name, checked for duplicates across shards."""
    files, weight_map = _checkpoint_layout(model_dir)
    entries: dict[str, TensorEntry] = {}
    for path in files:
        for name, entry in read_header(path).items():
            if name in entries:
                raise CorruptCheckpoint(
                    f"{model_dir}: tensor {name!r} appears in both {entries[name].file.name} and {path.name}"
                )
            entries[name] = entry
    if weight_map is not None:
        # An index that points at the wrong shard means the set of files is not the one it describes.
        wrong = sorted(
            n for n, shard in weight_map.items() if n not in entries or entries[n].file.name != shard
        )
        if wrong:
            shown = ", ".join(f"{n} (index: {weight_map[n]})" for n in wrong[:10])
            more = f" and {len(wrong) - 10} more" if len(wrong) > 10 else ""
            raise CorruptCheckpoint(
                f"{model_dir / INDEX_FILE}: tensors not found in their shard: {shown}{more}"
            )
    return entries


def estimate_weight_bytes(model_dir: Path, dtype: torch.dtype | None) -> int:
    """Bytes the weights will take once loaded in `dtype` (floating tensors convert, others keep theirs)."""
    total = 0
    for entry in index_checkpoint(model_dir).values():
        itemsize = (
            dtype.itemsize if dtype is not None and entry.dtype.is_floating_point else entry.dtype.itemsize
        )
        total += entry.numel * itemsize
    return total


def _parameter_slots(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parameters by name, and each name's canonical name: the first name under which its tensor is
    registered (tied weights, e.g. lm_head sharing embed_tokens, share one canonical name)."""
    params: dict[str, torch.Tensor] = {}
    canonical: dict[str, str] = {}
    first_name: dict[int, str] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        params[name] = p
        canonical[name] = first_name.setdefault(id(p), name)
    return params, canonical


@dataclass(frozen=True)
class _Layout:
    """How a parameter is filled: stacked over experts (dim 0) or not, and its row shards (along
    dim 0 of the per-expert slice; None: one tensor fills it). `slices`: under tensor parallelism,
    the part of the checkpoint tensor each shard reads (one per shard, or one when unsharded); None:
    the whole tensor."""

    stacked: bool
    shard_sizes: tuple[int, ...] | None
    slices: tuple[TensorSlice, ...] | None = None
    # Experts split over ranks: this rank's stacked parameter holds experts [start, start + count) of
    # `total` (the owner's `expert_range`); checkpoint experts outside belong to other ranks.
    experts: tuple[int, int, int] | None = None


def _layout(module: nn.Module, param_name: str) -> _Layout:
    owner_name, _, leaf = param_name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    stacked = getattr(owner, "expert_shard_sizes", None) or {}
    # A sharded layer (architectures.parallel_layers) names the slice of the checkpoint each rank reads.
    slices = (getattr(owner, "checkpoint_slices", None) or {}).get(leaf)
    if leaf in stacked:
        sizes = stacked[leaf]
        experts = getattr(owner, "expert_range", None)
        return _Layout(True, None if sizes is None else tuple(sizes), slices, experts)
    sizes = getattr(owner, "shard_sizes", None)
    return _Layout(False, None if sizes is None else tuple(sizes), slices)


def _covered_slots(target: WeightTarget, param: torch.Tensor, layout: _Layout) -> list[WeightTarget]:
    """The required slots one tensor fills: itself, or — when it leaves the expert or the shard
    open — every expert / shard (a checkpoint that already fuses qkv_proj or gate_up_proj, or
    stores experts stacked)."""
    if layout.stacked and target.expert is None:
        experts: list[int | None] = list(range(param.shape[0]))
    else:
        experts = [target.expert]
    if layout.shard_sizes is not None and target.shard is None:
        shards: list[int | None] = list(range(len(layout.shard_sizes)))
    else:
        shards = [target.shard]
    return [target._replace(expert=e, shard=sh) for e in experts for sh in shards]


def _slot_shape(param: torch.Tensor, layout: _Layout, target: WeightTarget) -> tuple[int, ...]:
    """The shape one checkpoint tensor must have to fill `target` of `param`."""
    shape = tuple(param.shape[1:] if layout.stacked and target.expert is not None else param.shape)
    if target.shard is not None and layout.shard_sizes is not None:
        shape = (layout.shard_sizes[target.shard],) + shape[1:]
    return shape


def _checkpoint_shape(param: torch.Tensor, layout: _Layout, target: WeightTarget) -> tuple[int, ...]:
    """The checkpoint tensor's shape for `target`: the slot's shape, with each sliced dim at its
    full (unsharded) size."""
    shape = list(_slot_shape(param, layout, target))
    if layout.experts is not None and target.expert is None:  # a stacked tensor holds every expert
        shape[0] = layout.experts[2]
    if layout.slices is None:
        return tuple(shape)
    lead = 1 if layout.stacked and target.expert is None else 0  # a stacked checkpoint tensor
    if layout.shard_sizes is not None and target.shard is None:  # one tensor fills every shard
        shape[lead] = sum(s.full for s in layout.slices)
        return tuple(shape)
    cut = layout.slices[target.shard or 0]
    shape[lead + cut.dim] = cut.full
    return tuple(shape)


def _slice_copies(
    param: torch.Tensor, layout: _Layout, target: WeightTarget
) -> list[tuple[torch.Tensor, tuple[tuple[int, int, int], ...]]]:
    """(destination view, narrows (dim, start, length) of the checkpoint tensor) for `target`."""
    view = _slot_view(param, layout, target)
    if layout.experts is not None and target.expert is None:  # this rank's experts of a stacked tensor
        start, count, _ = layout.experts
        return [
            (v, ((0, start, count), *n))
            for v, n in _slice_copies(param, replace(layout, experts=None), target)
        ]
    if layout.slices is None:
        return [(view, ())]
    lead = 1 if layout.stacked and target.expert is None else 0
    if layout.shard_sizes is not None and target.shard is None:
        copies = []
        offset = start = 0
        for size, cut in zip(layout.shard_sizes, layout.slices, strict=True):
            dest = view.narrow(lead, start, size)
            copies.append((dest, ((lead, offset + cut.start, cut.length),)))
            offset += cut.full
            start += size
        return copies
    cut = layout.slices[target.shard or 0]
    return [(view, ((lead + cut.dim, cut.start, cut.length),))]


def _required_slots(name: str, param: torch.Tensor, layout: _Layout) -> list[WeightTarget]:
    """Every (expert, shard) of `param` a checkpoint tensor must fill."""
    if layout.shard_sizes is not None:
        rows_dim = 1 if layout.stacked else 0
        rows = param.shape[rows_dim] if param.dim() > rows_dim else 0
        if sum(layout.shard_sizes) != rows:
            raise InvalidArgument(
                f"parameter {name}: shard_sizes {list(layout.shard_sizes)} do not add up to its {rows} rows"
            )
    shards: list[int | None] = (
        list(range(len(layout.shard_sizes))) if layout.shard_sizes is not None else [None]
    )
    experts: list[int | None] = list(range(param.shape[0])) if layout.stacked else [None]
    return [WeightTarget(name, shard, expert) for expert in experts for shard in shards]


def _slot_view(param: torch.Tensor, layout: _Layout, target: WeightTarget) -> torch.Tensor:
    """The part of `param` that `target`'s tensor fills (a view)."""
    view = param[target.expert] if target.expert is not None else param
    if target.shard is not None and layout.shard_sizes is not None:
        sizes = layout.shard_sizes
        view = view.narrow(0, sum(sizes[: target.shard]), sizes[target.shard])
    return view


def plan_load(
    module: nn.Module, entries: dict[str, TensorEntry], mapping: WeightMapping, where: str = ""
) -> list[tuple[TensorEntry, WeightTarget]]:
    """Match every checkpoint tensor to its destination; raise one error listing every problem.

    Returns (tensor, target with the canonical parameter name) for every tensor to copy. A tied
    parameter is required once; any of its names may provide it (all present ones are shape-checked,
    and the first-registered name wins: in the usual layout that is embed_tokens, as in transformers).
    A stacked parameter needs one tensor per expert (and shard); a missing one is named as the
    checkpoint would name it.
    """
    params, canonical = _parameter_slots(module)
    tied: dict[str, list[str]] = {}
    for name, first in canonical.items():
        tied.setdefault(first, []).append(name)
    layouts = {name: _layout(module, name) for name in tied}
    required: set[WeightTarget] = set()
    for name, layout in layouts.items():
        required.update(_required_slots(name, params[name], layout))
    # canonical target → [(rank of the name among the tied names, tensor, parameter name)]
    candidates: dict[WeightTarget, list[tuple[int, TensorEntry, str]]] = {}
    unexpected: list[str] = []
    mismatched: list[str] = []
    present: set[WeightTarget] = set()  # slots with a tensor, even a wrong one: not "missing"
    for entry in sorted(entries.values(), key=lambda e: e.name):
        target = mapping.map(entry.name)
        if target is None:
            continue
        experts = layouts[canonical[target.param]].experts if target.param in canonical else None
        if experts is not None and target.expert is not None:
            if not experts[0] <= target.expert < experts[0] + experts[1]:
                continue  # another rank's expert
            target = target._replace(expert=target.expert - experts[0])
        key = target._replace(param=canonical.get(target.param, ""))
        slots = (
            _covered_slots(key, params[target.param], layouts[key.param]) if target.param in params else []
        )
        if not slots or any(slot not in required for slot in slots):
            unexpected.append(entry.name)
            continue
        present.update(slots)
        param = params[target.param]
        expected = _checkpoint_shape(param, layouts[key.param], key)
        if entry.shape != expected:
            mismatched.append(f"{entry.name} is {list(entry.shape)}, expected {list(expected)}")
            continue
        if (
            not (entry.dtype.is_floating_point and param.dtype.is_floating_point)
            and entry.dtype != param.dtype
        ):
            mismatched.append(f"{entry.name} has dtype {entry.dtype}, expected {param.dtype}")
            continue
        for slot in slots:
            candidates.setdefault(slot, []).append(
                (tied[key.param].index(target.param), entry, target.param, key)
            )
    plan: dict[str, tuple[TensorEntry, WeightTarget]] = {}
    for slot, found in candidates.items():
        by_param: dict[str, list[str]] = {}
        for _, entry, param_name, _ in found:
            by_param.setdefault(param_name, []).append(entry.name)
        clashes = [names for names in by_param.values() if len(names) > 1]
        if clashes:
            mismatched.extend(f"{' and '.join(names)} all fill {slot.describe()}" for names in clashes)
            continue
        _, entry, _, fills = min(found, key=lambda c: c[0])
        plan[entry.name] = (entry, fills)
    missing = []
    for target in sorted(required - present, key=_slot_order):
        experts = layouts[target.param].experts
        if experts is not None and target.expert is not None:  # named by its checkpoint index
            target = target._replace(expert=target.expert + experts[0])
        text = mapping.checkpoint_name(target)
        others = tied[target.param][1:]
        missing.append(f"{text} (or tied {', '.join(others)})" if others else text)
    if missing or unexpected or mismatched:
        raise WeightsMismatch(missing=missing, unexpected=unexpected, mismatched=mismatched, where=where)
    return sorted(plan.values(), key=lambda item: item[0].name)


def _slot_order(t: WeightTarget) -> tuple[str, int, int]:
    return (t.param, -1 if t.expert is None else t.expert, -1 if t.shard is None else t.shard)


Narrows = tuple[tuple[int, int, int], ...]


def _read_into(target: torch.Tensor, entry: TensorEntry, mm: mmap.mmap, narrows: Narrows = ()) -> None:
    if entry.numel == 0:
        return
    source = torch.frombuffer(mm, dtype=entry.dtype, count=entry.numel, offset=entry.offset).view(entry.shape)
    for dim, start, length in narrows:  # this rank's slice: only its pages are touched
        source = source.narrow(dim, start, length)
    target.copy_(source)  # converts dtype and moves to the target device in one step
    del source


def _byte_run(entry: TensorEntry, narrows: Narrows) -> tuple[int, int] | None:
    """(file offset, bytes) when the (narrowed) tensor is one contiguous run of the file: no narrow,
    or rows [start, start + length) along dim 0; None otherwise (strided: a column slice)."""
    if not narrows:
        return entry.offset, entry.nbytes
    if len(narrows) == 1 and narrows[0][0] == 0 and entry.shape:
        _, start, length = narrows[0]
        row = entry.nbytes // entry.shape[0] if entry.shape[0] else 0
        return entry.offset + start * row, length * row
    return None


def _reads_directly(target: torch.Tensor, entry: TensorEntry, narrows: Narrows = ()) -> bool:
    """True when the file's bytes are the target's bytes: CPU, same dtype, one contiguous run."""
    return (
        target.device.type == "cpu"
        and target.dtype == entry.dtype
        and target.is_contiguous()
        and _byte_run(entry, narrows) is not None
    )


def _read_direct(target: torch.Tensor, entry: TensorEntry, f: BinaryIO, narrows: Narrows = ()) -> None:
    """read(2) straight into the parameter's memory: one copy (page cache → parameter), and unlike a
    memory map no file page is mapped into the process, so resident memory never holds the checkpoint
    twice. Positional reads (pread), so several threads may read one file at once."""
    offset, nbytes = _byte_run(entry, narrows) or (entry.offset, entry.nbytes)
    if nbytes == 0:
        return
    view = memoryview(target.detach().reshape(-1).view(torch.uint8).numpy())
    fd = f.fileno()
    done = 0
    while done < nbytes:
        n = os.preadv(fd, [view[done:nbytes]], offset + done)
        if not n:
            raise CorruptCheckpoint(
                f"{entry.file}: tensor {entry.name!r} ends early (the file shrank while loading)"
            )
        done += n


# Direct reads of one Load run on up to this many threads: the copies out of the page cache, and the
# page faults of the fresh parameter memory they land in, are the Load's main CPU cost.
READ_THREADS = 4
_PARALLEL_READ_BYTES = 16 << 20  # below this, one thread


def _read_all_direct(reads: list[tuple[TensorEntry, torch.Tensor, Narrows]], f: BinaryIO) -> int:
    """Every (entry, target, narrows) of `reads` read directly from `f`, in parallel when large;
    returns the bytes read."""
    total = sum(t.numel() * e.dtype.itemsize for e, t, _ in reads)
    threads = min(
        READ_THREADS, len(reads), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    )
    if threads < 2 or total < _PARALLEL_READ_BYTES:
        for entry, target, narrows in reads:
            _read_direct(target, entry, f, narrows)
        return total
    # Plain threads: the reads are syscalls (no torch op, so no OpenMP team), the GIL is released.
    with ThreadPoolExecutor(threads, thread_name_prefix="read") as pool:
        for future in [pool.submit(_read_direct, t, e, f, n) for e, t, n in reads]:
            future.result()
    return total


LOAD_MODES = ("mmap", "copy")


class WeightsLoaded(NamedTuple):
    """What a load took from the checkpoint: every byte used, and how many of them stay file-backed
    (parameters that are views of the memory-mapped file, shared with the page cache)."""

    total_bytes: int
    mapped_bytes: int


def _mappable_runs(
    module: nn.Module, plan: list[tuple[TensorEntry, WeightTarget]]
) -> dict[str, list[TensorEntry]]:
    """Parameters (canonical name → their tensors in file order) that can be the file's own bytes: on
    the CPU, the checkpoint's dtype, contiguous, and filled by tensors of one file that lie back to back
    in the parameter's row order (a plain weight; gate/up, which safetensors' sorted names store
    adjacently; stacked experts written in order). Anything else is copied."""
    params, _ = _parameter_slots(module)
    by_param: dict[str, list[tuple[TensorEntry, torch.Tensor]]] = {}
    for entry, target in plan:
        layout = _layout(module, target.param)
        if layout.slices is not None or layout.experts is not None:
            continue  # a tensor-parallel rank holds part of the tensor: copied, never mapped
        view = _slot_view(params[target.param], layout, target)
        by_param.setdefault(target.param, []).append((entry, view))
    runs: dict[str, list[TensorEntry]] = {}
    for name, items in by_param.items():
        param = params[name]
        if param.device.type != "cpu" or not param.is_contiguous() or param.numel() == 0:
            continue
        items.sort(key=lambda it: it[1].storage_offset())
        first = items[0][0]
        itemsize = param.element_size()
        if first.offset % itemsize or sum(e.nbytes for e, _ in items) != param.numel() * itemsize:
            continue
        base = param.storage_offset()
        if all(
            e.file == first.file
            and e.dtype == param.dtype
            and v.is_contiguous()
            and e.offset - first.offset == (v.storage_offset() - base) * itemsize
            for e, v in items
        ):
            runs[name] = [e for e, _ in items]
    return runs


def _map_file(path: Path) -> mmap.mmap:
    # ACCESS_COPY (MAP_PRIVATE): writable, as torch.frombuffer wants, and a write (an in-place weight
    # update) copies that page for this process only, never touching the file. Unwritten pages are
    # the page cache's, shared with every process that maps the file.
    with path.open("rb", buffering=0) as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)


@torch.no_grad()
def load_weights(module: nn.Module, model_dir: Path, mapping: WeightMapping, mode: str = "copy") -> int:
    """Load every weight of `model_dir` into `module` strictly; returns the bytes taken."""
    return load_checkpoint(module, model_dir, mapping, mode).total_bytes


@torch.no_grad()
def load_checkpoint(
    module: nn.Module, model_dir: Path, mapping: WeightMapping, mode: str = "copy"
) -> WeightsLoaded:
    """Load every weight of `model_dir` into `module` strictly.

    mode "mmap": a parameter whose bytes are the file's bytes (see `_mappable_runs`) becomes a view of
    a private memory map of the file instead of a copy — no read at Load, pages come in on first use
    and are shared with other processes mapping the same file. The file must then never change in
    place: replace a checkpoint by writing a new file and renaming it over the old one (the mapping
    keeps the old inode alive); truncating or rewriting a mapped file in place makes the worker fail
    (SIGBUS) or serve the new bytes. Everything else (dtype conversion, q/k/v fused from separate
    tensors, GPU targets) is copied as in mode "copy".
    """
    if mode not in LOAD_MODES:
        raise InvalidArgument(f"load mode {mode!r} is not one of {', '.join(LOAD_MODES)}")
    entries = index_checkpoint(model_dir)
    plan = plan_load(module, entries, mapping, where=str(model_dir))
    params, _ = _parameter_slots(module)
    mapped_bytes = 0
    if mode == "mmap":
        runs = _mappable_runs(module, plan)
        maps: dict[Path, mmap.mmap] = {}
        for name, run in runs.items():
            param = params[name]
            mm = maps.get(run[0].file)
            if mm is None:
                mm = maps[run[0].file] = _map_file(run[0].file)
            # The parameter object stays (tied names keep sharing it); only its storage changes.
            param.data = torch.frombuffer(
                mm, dtype=param.dtype, count=param.numel(), offset=run[0].offset
            ).view(param.shape)
            mapped_bytes += param.numel() * param.element_size()
        maps.clear()  # each map lives as long as the parameters viewing it
        mapped_names = {e.name for run in runs.values() for e in run}
        plan = [item for item in plan if item[0].name not in mapped_names]
    by_file: dict[Path, list[tuple[TensorEntry, WeightTarget]]] = {}
    for item in plan:
        by_file.setdefault(item[0].file, []).append(item)
    total = mapped_bytes
    for path, items in by_file.items():
        targets: list[tuple[TensorEntry, torch.Tensor, Narrows]] = []
        for entry, target in sorted(items, key=lambda it: it[0].offset):
            param = params[target.param]
            for view, narrows in _slice_copies(param, _layout(module, target.param), target):
                targets.append((entry, view, narrows))
        mapped = [(e, t, n) for e, t, n in targets if not _reads_directly(t, e, n)]
        with open_regular(path, buffering=0) as f:
            total += _read_all_direct([(e, t, n) for e, t, n in targets if _reads_directly(t, e, n)], f)
            if not mapped:
                continue
            # Conversions (dtype, device, strided targets) copy from a map of the file.
            # ACCESS_COPY gives a writable (copy-on-write) view, which torch.frombuffer wants; nothing
            # is ever written, so no page is copied.
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        try:
            for entry, target, narrows in mapped:
                _read_into(target, entry, mm, narrows)
                total += target.numel() * entry.dtype.itemsize
        finally:
            try:
                mm.close()
            except BufferError:  # a view still alive somewhere; the map closes when it dies
                pass
    return WeightsLoaded(total, mapped_bytes)
