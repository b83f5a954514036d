"""In-place weight updates: stage checkpoint tensors, check them as strictly as a Load, apply in one step.

An update never writes a parameter before every tensor has arrived and passed the Load's checks
(names through the architecture's weight mapping, shapes, dtypes, completeness, tied weights), so a
bad or cut-off update leaves the old weights serving. Tensors are staged in host memory (or on the
device for a device-side broadcast) in their checkpoint dtype and converted by the same `copy_` a
Load uses, so an update from checkpoint B gives bit-for-bit the parameters a fresh Load of B gives.

Where the tensors come from is the caller's business (a checkpoint directory, a gRPC stream, a
torch.distributed broadcast); this module sees names, dtypes, shapes and bytes.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import CorruptCheckpoint, FailedPrecondition, InvalidArgument, WeightsMismatch
from .safetensors_loader import (
    TensorEntry,
    _covered_slots,
    _layout,
    _parameter_slots,
    _read_into,
    _required_slots,
    _slice_copies,
    _slot_shape,
    _slot_view,
    open_regular,
    plan_load,
)
from .weights import WeightMapping, WeightTarget

# (checkpoint tensor, where it goes: canonical parameter, expert of a stacked one, fused shard)
UpdatePlan = list[tuple[TensorEntry, WeightTarget]]
_NO_FILE = Path("")


@dataclass(frozen=True)
class UpdateTarget:
    """What an update writes into: a model's network and the mapping of its checkpoint names."""

    network: nn.Module
    mapping: WeightMapping


def update_target(model: object) -> UpdateTarget:
    """The network of a loaded model and the weight mapping its class declares (`weight_mapping`,
    the one its Load used)."""
    network = getattr(model, "network", None)
    if not isinstance(network, nn.Module):
        raise FailedPrecondition(f"{type(model).__name__} has no network whose weights can be updated")
    mapping = getattr(network, "weight_mapping", None)
    if not isinstance(mapping, WeightMapping):
        raise FailedPrecondition(
            f"{type(network).__name__} declares no weight_mapping, so its weights cannot be updated by name"
        )
    return UpdateTarget(network, mapping)


def tensor_spec(name: str, dtype: torch.dtype, shape: Iterable[int]) -> TensorEntry:
    """A checkpoint tensor described by name, dtype and shape only (no file behind it)."""
    shape = tuple(int(d) for d in shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"tensor {name!r} has a negative dimension in shape {list(shape)}")
    numel = 1
    for d in shape:
        numel *= d
    return TensorEntry(name, _NO_FILE, dtype, shape, 0, numel * dtype.itemsize)


def check_update(target: UpdateTarget, specs: Iterable[TensorEntry], where: str) -> UpdatePlan:
    """The Load's strict check of a complete set of checkpoint tensors (one error naming every
    missing, unexpected and mis-shaped tensor); returns what goes where."""
    entries: dict[str, TensorEntry] = {}
    for spec in specs:
        if spec.name in entries:
            raise InvalidArgument(f"{where}: tensor {spec.name!r} is sent twice")
        entries[spec.name] = spec
    return plan_load(target.network, entries, target.mapping, where=where)


class TensorChecker:
    """Checks one checkpoint tensor at a time against the model (name, shape, dtype), so a stream
    is refused at the first bad tensor instead of after gigabytes; completeness is `check_update`'s."""

    def __init__(self, target: UpdateTarget) -> None:
        self.target = target
        self.params, self.canonical = _parameter_slots(target.network)
        self.layouts = {
            name: _layout(target.network, name) for name, first in self.canonical.items() if name == first
        }
        self.required: set[WeightTarget] = set()
        for name, layout in self.layouts.items():
            self.required.update(_required_slots(name, self.params[name], layout))

    def check(self, spec: TensorEntry, where: str) -> None:
        target = self.target.mapping.map(spec.name)
        if target is None:
            return  # a name the architecture ignores (rotary inv_freq): accepted, never applied
        key = target._replace(param=self.canonical.get(target.param, ""))
        param = self.params.get(target.param)
        # A tensor without a shard (expert) fills every shard (expert): a checkpoint that fuses
        # q/k/v or gate/up, or stores experts stacked.
        slots = _covered_slots(key, param, self.layouts[key.param]) if param is not None else []
        if not slots or any(slot not in self.required for slot in slots):
            raise WeightsMismatch(unexpected=[spec.name], where=where)
        expected = _slot_shape(param, self.layouts[key.param], key)
        if spec.shape != expected:
            raise WeightsMismatch(
                mismatched=[f"{spec.name} is {list(spec.shape)}, expected {list(expected)}"], where=where
            )
        if not (spec.dtype.is_floating_point and param.dtype.is_floating_point) and spec.dtype != param.dtype:
            raise WeightsMismatch(
                mismatched=[f"{spec.name} has dtype {spec.dtype}, expected {param.dtype}"], where=where
            )


def parameter_slice(
    network: nn.Module, params: Mapping[str, torch.Tensor], target: WeightTarget
) -> torch.Tensor:
    """The part of a parameter one checkpoint tensor fills: the whole parameter, one expert's slice
    of a stacked one, and/or the rows of one shard of a fused one (a view). The one place a
    tensor-parallel rank will cut its own slice."""
    return _slot_view(params[target.param], _layout(network, target.param), target)


@torch.no_grad()
def apply_update(target: UpdateTarget, plan: UpdatePlan, staged: Mapping[str, torch.Tensor]) -> int:
    """Copy every staged tensor into its parameter slice (the caller holds the model exclusively);
    returns the checkpoint bytes applied. Converts dtype and device exactly as a Load does."""
    params, _ = _parameter_slots(target.network)
    missing = [entry.name for entry, _ in plan if entry.name not in staged]
    if missing:  # a programming error, not a client's: nothing is written
        raise AssertionError(f"staged tensors missing for {missing}")
    total = 0
    for entry, where in plan:
        parameter_slice(target.network, params, where).copy_(staged[entry.name])
        total += entry.nbytes
    return total


def read_staged(plan: UpdatePlan) -> dict[str, torch.Tensor]:
    """Read the planned tensors of a checkpoint directory into host memory, in the file's dtype
    (read(2) straight into each tensor: no memory map keeps file pages resident)."""
    staged: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[TensorEntry]] = {}
    for entry, _ in plan:
        by_file.setdefault(entry.file, []).append(entry)
    for path, entries in by_file.items():
        with path.open("rb", buffering=0) as f:
            for entry in sorted(entries, key=lambda e: e.offset):
                tensor = torch.empty(entry.shape, dtype=entry.dtype)
                if entry.nbytes:
                    view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
                    f.seek(entry.offset)
                    done = 0
                    while done < entry.nbytes:
                        n = f.readinto(view[done:])
                        if not n:
                            raise CorruptCheckpoint(
                                f"{path}: tensor {entry.name!r} ends early (the file shrank)"
                            )
                        done += n
                staged[entry.name] = tensor
    return staged


class TensorAssembler:
    """Puts streamed tensors together from pieces: bytes [offset, offset + len) of total_bytes.

    Pieces of one tensor come in order and back to back (each piece starts where the last ended);
    different tensors may interleave. Each tensor is checked against the model at its first piece.
    """

    def __init__(self, checker: TensorChecker, where: str) -> None:
        if sys.byteorder != "little":  # pragma: no cover - big-endian hosts only
            raise FailedPrecondition("streamed weight updates need a little-endian host")
        self.checker = checker
        self.where = where
        self._specs: dict[str, TensorEntry] = {}
        self._tensors: dict[str, torch.Tensor] = {}
        self._views: dict[str, memoryview] = {}
        self._received: dict[str, int] = {}
        self.bytes = 0

    def add(
        self, name: str, dtype: torch.dtype, shape: Iterable[int], data: bytes, offset: int, total_bytes: int
    ) -> None:
        if not name:
            raise InvalidArgument(f"{self.where}: a chunk has no tensor name")
        spec = self._specs.get(name)
        repeated = spec is not None
        if spec is None:
            spec = tensor_spec(name, dtype, shape)
            total = total_bytes or len(data)
            if total != spec.nbytes:
                raise InvalidArgument(
                    f"{self.where}: tensor {name!r} of shape {list(spec.shape)} and dtype {dtype} has "
                    f"{spec.nbytes} bytes, but total_bytes says {total}"
                )
            self.checker.check(spec, self.where)
            tensor = torch.empty(spec.shape, dtype=dtype)
            self._specs[name] = spec
            self._tensors[name] = tensor
            self._views[name] = (
                memoryview(tensor.reshape(-1).view(torch.uint8).numpy()) if spec.nbytes else None
            )
            self._received[name] = 0
        elif dtype != spec.dtype or tuple(shape) != spec.shape:
            raise InvalidArgument(
                f"{self.where}: a piece of tensor {name!r} says {dtype} {list(shape)}, "
                f"its first piece said {spec.dtype} {list(spec.shape)}"
            )
        received = self._received[name]
        if repeated and received == spec.nbytes:
            raise InvalidArgument(f"{self.where}: tensor {name!r} is sent twice")
        if offset != received:
            raise InvalidArgument(
                f"{self.where}: tensor {name!r}: a piece starts at byte {offset}, expected {received} "
                "(pieces of a tensor come in order)"
            )
        end = offset + len(data)
        if end > spec.nbytes:
            raise InvalidArgument(
                f"{self.where}: tensor {name!r}: a piece ends at byte {end}, past its {spec.nbytes} bytes"
            )
        if data:
            self._views[name][offset:end] = data
        self._received[name] = end
        self.bytes += len(data)

    def finish(self) -> tuple[list[TensorEntry], dict[str, torch.Tensor]]:
        """Every tensor, complete; an incomplete one is INVALID_ARGUMENT naming what arrived."""
        short = [
            f"{name} ({got} of {self._specs[name].nbytes} bytes)"
            for name, got in self._received.items()
            if got != self._specs[name].nbytes
        ]
        if short:
            raise InvalidArgument(
                f"{self.where}: the stream ended with incomplete tensor(s): {', '.join(short)}"
            )
        self._views.clear()
        return list(self._specs.values()), self._tensors


# (parameter view, the checkpoint's part for it, in the file's dtype)
StagedSlices = list[tuple[torch.Tensor, torch.Tensor]]


def read_staged_slices(target: UpdateTarget, plan: UpdatePlan) -> StagedSlices:
    """A tensor-parallel rank's staging: only the rows or columns of each planned tensor that this
    rank's shard holds (the narrows a Load reads), in host memory in the file's dtype, so that
    `apply_staged_slices` converts them with the same copy_ a Load does (bit-identical results)."""
    import mmap

    params, _ = _parameter_slots(target.network)
    by_file: dict[Path, list[tuple[TensorEntry, WeightTarget]]] = {}
    for item in plan:
        by_file.setdefault(item[0].file, []).append(item)
    staged: StagedSlices = []
    for path, items in by_file.items():
        with open_regular(path, buffering=0) as f:
            size = f.seek(0, 2)
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
        try:
            for entry, where in sorted(items, key=lambda it: it[0].offset):
                if entry.offset + entry.nbytes > size:
                    raise CorruptCheckpoint(f"{path}: tensor {entry.name!r} ends early (the file shrank)")
                layout = _layout(target.network, where.param)
                for view, narrows in _slice_copies(params[where.param], layout, where):
                    part = torch.empty(view.shape, dtype=entry.dtype)
                    if mm is not None:
                        _read_into(part, entry, mm, narrows)
                    staged.append((view, part))
        finally:
            if mm is not None:
                try:
                    mm.close()
                except BufferError:  # a view still alive somewhere; the map closes when it dies
                    pass
    return staged


@torch.no_grad()
def apply_staged_slices(staged: StagedSlices) -> None:
    """Copy every staged slice into its parameter view (the caller holds the model exclusively)."""
    for view, part in staged:
        view.copy_(part)
