"""Quantized loading: which linear layers are quantized, their placeholders while the network is on
the meta device, and filling them from the checkpoint one layer at a time.

Flow (build_causal_lm): plan_quantized_layers on the meta network (decides, from the checkpoint's
tensor names, which layers are quantized; ignored layers such as `lm_head` simply lack the format's
marker tensor) → the network is materialised (placeholders own only their bias) → fill_quantized_layers
reads each layer's tensors, unpacks and fuses them, and installs the kernel-ready layer → the dense
loader loads everything else, skipping the tensors consumed here. Peak memory stays near the quantized
size: a dense (on-the-fly) layer is quantized right after it is read.

Under tensor parallelism (on-the-fly only; pre-quantized checkpoints are refused before this runs)
each rank cuts its slice of the dense tensor (the sharded layer's `checkpoint_slices`) and quantizes
that slice as a single-rank Load quantizes a whole tensor: column-parallel slices are whole output
rows (the same int8 scales as one rank); row-parallel slices are a run of input columns, so int8
scales are per output row of the slice and int4 groups are chosen for the per-rank input size
(`int4_group_size`), never straddling the split. A row-parallel layer all-reduces its partial output
before adding its (whole) bias.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn

from registry import CorruptCheckpoint, InvalidConfig, WeightMapping
from registry.parallel import ParallelContext, TensorSlice
from registry.quantization.formats import FORMAT_MARKER, FORMAT_TENSORS, fuse, read_quantized
from registry.quantization.scheme import QuantScheme
from registry.safetensors_loader import TensorEntry
from registry.weights import WeightTarget

from .moe import SparseMoeBlock, StackedExperts
from .parallel_layers import RowParallelLinear
from .quantized_experts import QuantizedExperts
from .quantized_linear import QuantizedLinear, make_quantized_linear


@dataclass(frozen=True)
class QuantizedSlot:
    module: str  # our module name, e.g. model.layers.0.self_attn.qkv_proj
    parts: tuple[str, ...]  # checkpoint layer of each shard, e.g. (…q_proj, …k_proj, …v_proj)
    shard_sizes: tuple[int, ...] | None
    in_features: int
    out_features: int
    bias: bool
    # Tensor parallelism: this rank's part of the checkpoint weight (one per part, or several cut
    # from one fused tensor), the bias slices, and the group a row-parallel layer all-reduces over.
    slices: tuple[TensorSlice, ...] | None = None
    bias_slices: tuple[TensorSlice, ...] | None = None
    reduce: ParallelContext | None = None


class _Placeholder(QuantizedLinear):
    """Stands in for a quantized layer until its weights are read (owns only the bias)."""

    kind = "placeholder"

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("quantized layer used before its weights were loaded")


@dataclass(frozen=True)
class SkippingMapping(WeightMapping):
    """The architecture's mapping, minus checkpoint tensors the quantized layers already consumed."""

    skip: frozenset[str] = frozenset()

    @classmethod
    def around(cls, mapping: WeightMapping, skip: frozenset[str]) -> SkippingMapping:
        return cls(**{f.name: getattr(mapping, f.name) for f in fields(mapping)}, skip=skip)

    def map(self, name: str) -> tuple[str, int | None] | None:
        if name in self.skip:
            return None
        return super().map(name)


def plan_quantized_layers(
    network: nn.Module, entries: dict[str, TensorEntry], mapping: WeightMapping, scheme: QuantScheme
) -> list[QuantizedSlot]:
    """Replace each quantized linear layer of the (meta) network with a placeholder; returns them."""
    marker = FORMAT_MARKER[scheme.fmt]
    tied = {
        id(p) for name, m in network.named_modules() if isinstance(m, nn.Embedding) for p in m.parameters()
    }
    # Routers pick experts by small logit margins: quantizing at Load keeps them dense, as serving
    # stacks do (a checkpoint that ships them quantized is read as it is).
    routers = {
        id(r)
        for m in network.modules()
        if isinstance(m, SparseMoeBlock)
        for r in (m.gate, getattr(m, "shared_expert_gate", None))
        if r is not None
    }
    slots: list[QuantizedSlot] = []
    for name, module in list(network.named_modules()):
        if isinstance(module, StackedExperts):
            slots += _plan_experts(network, name, module, entries, mapping, marker)
            continue
        if not isinstance(module, nn.Linear) or id(module.weight) in tied:
            continue
        if scheme.on_the_fly and (name == "lm_head" or id(module) in routers):
            continue  # the output projection stays in the compute dtype, like the embeddings
        sizes = getattr(module, "shard_sizes", None)
        shards = range(len(sizes)) if sizes is not None else [None]
        if f"{name}.{marker}" in entries:  # the checkpoint stores the fused projection itself (Phi-3)
            parts: tuple[str, ...] = (name,)
        else:
            parts = tuple(
                mapping.checkpoint_name(WeightTarget(f"{name}.weight", s)).removesuffix(".weight")
                for s in shards
            )
        present = [f"{p}.{marker}" in entries for p in parts]
        if not any(present):
            continue
        if not all(present):
            raise CorruptCheckpoint(
                f"{', '.join(parts)} are fused into {name} but only some are quantized "
                f"({', '.join(p for p, q in zip(parts, present, strict=True) if q)})"
            )
        cuts = getattr(module, "checkpoint_slices", None) or {}
        if cuts and not scheme.on_the_fly:  # _check_shardable refuses these first; kept as a guard
            raise InvalidConfig(f"{name}: a pre-quantized layer cannot be split across tensor-parallel ranks")
        slot = QuantizedSlot(
            name,
            parts,
            None if sizes is None else tuple(sizes),
            module.in_features,
            module.out_features,
            module.bias is not None,
            cuts.get("weight"),
            cuts.get("bias"),
            module.parallel if isinstance(module, RowParallelLinear) else None,
        )
        _set_module(
            network,
            name,
            _tp_layer(_Placeholder(slot.in_features, slot.out_features, slot.bias, slot.shard_sizes), slot),
        )
        slots.append(slot)
    if not slots and not scheme.on_the_fly:
        raise InvalidConfig(
            f"config.json: quantization_config says {scheme.method} but no layer has a {marker!r} tensor"
        )
    return slots


def _plan_experts(
    network: nn.Module,
    name: str,
    experts: StackedExperts,
    entries: dict[str, TensorEntry],
    mapping: WeightMapping,
    marker: str,
) -> list[QuantizedSlot]:
    """Per-expert quantized layers (`<name>.gate_up.<e>`, gate and up fused; `<name>.down.<e>`) when
    the checkpoint stores the experts quantized, one by one; [] when it stores them dense."""
    count, inter = experts.num_experts, experts.intermediate
    hidden = experts.down_proj.shape[1]

    def part(param: str, shard: int | None, e: int) -> str:
        return mapping.checkpoint_name(WeightTarget(f"{name}.{param}", shard, e)).removesuffix(".weight")

    gate_up = [(part("gate_up_proj", 0, e), part("gate_up_proj", 1, e)) for e in range(count)]
    down = [(part("down_proj", None, e),) for e in range(count)]
    present = [f"{p}.{marker}" in entries for parts in gate_up + down for p in parts]
    if not any(present):
        return []
    if getattr(experts, "checkpoint_slices", None) or getattr(experts, "expert_range", None):
        raise InvalidConfig(
            f"{name}: experts quantized at Load are not split across tensor-parallel ranks yet; load "
            f"this mixture-of-experts model with tensor_parallel_size 1 or without quantization"
        )
    if not all(present):
        missing = next(p for parts in gate_up + down for p in parts if f"{p}.{marker}" not in entries)
        raise CorruptCheckpoint(f"{name}: some experts are quantized but {missing} has no {marker!r} tensor")
    slots = [
        QuantizedSlot(f"{name}.gate_up.{e}", gate_up[e], (inter, inter), hidden, 2 * inter, False)
        for e in range(count)
    ]
    slots += [QuantizedSlot(f"{name}.down.{e}", down[e], None, inter, hidden, False) for e in range(count)]
    holders = [_Placeholder(s.in_features, s.out_features, False, s.shard_sizes) for s in slots]
    _set_module(network, name, QuantizedExperts(experts, holders[:count], holders[count:]))
    return slots


def fill_quantized_layers(
    network: nn.Module,
    slots: list[QuantizedSlot],
    entries: dict[str, TensorEntry],
    scheme: QuantScheme,
    device: torch.device,
    dtype: torch.dtype,
) -> frozenset[str]:
    """Read, unpack and install every planned layer; returns the checkpoint tensors consumed."""
    consumed: set[str] = set()
    suffixes = FORMAT_TENSORS[scheme.fmt]

    def get(name: str) -> torch.Tensor | None:
        entry = entries.get(name)
        if entry is None:
            return None
        consumed.add(name)
        return read_tensor(entry)

    for slot in slots:
        parts = [read_quantized(scheme, _slicing(get, slot, i), part) for i, part in enumerate(slot.parts)]
        weight = fuse(parts, slot.module)
        del parts
        if weight.shape != (slot.out_features, slot.in_features):
            raise CorruptCheckpoint(
                f"{', '.join(slot.parts)}: quantized weight is {list(weight.shape)}, "
                f"expected {[slot.out_features, slot.in_features]}"
            )
        old = network.get_submodule(slot.module)
        layer = _tp_layer(make_quantized_linear(weight, device, dtype, slot.bias, slot.shard_sizes), slot)
        if slot.bias:
            layer.bias = old.bias  # already materialised; the dense loader fills it
        _set_module(network, slot.module, layer)
        for part in slot.parts:  # extra per-format tensors we accept and do not need (input_scale, ...)
            consumed.update(f"{part}.{s}" for s in suffixes if f"{part}.{s}" in entries)
        del old, weight, layer
        _return_free_heap()
    return frozenset(consumed)


def _tp_layer(layer: QuantizedLinear, slot: QuantizedSlot) -> QuantizedLinear:
    """Give a quantized layer its tensor-parallel part: the bias slices the dense loader reads, and
    the all-reduce of a row-parallel layer."""
    if slot.bias_slices is not None:
        layer.checkpoint_slices = {"bias": slot.bias_slices}
    layer.reduce = slot.reduce
    return layer


def _slicing(get, slot: QuantizedSlot, index: int):
    """`get` for part `index` of `slot`, returning only this rank's slice of its dense weight."""
    if slot.slices is None:
        return get
    cuts = slot.slices if len(slot.parts) == 1 else slot.slices[index : index + 1]

    def sliced(name: str) -> torch.Tensor | None:
        t = get(name)
        if t is None or not name.endswith(".weight"):
            return t
        return _cut(t, cuts, name)

    return sliced


def _cut(t: torch.Tensor, cuts: tuple[TensorSlice, ...], name: str) -> torch.Tensor:
    """This rank's slice of checkpoint tensor `name`: one cut, or one per part of a fused tensor
    (the parts' full sizes laid end to end along dim 0)."""
    if len(cuts) == 1:
        c = cuts[0]
        if t.dim() != 2 or t.shape[c.dim] != c.full:
            raise CorruptCheckpoint(f"tensor {name} is {list(t.shape)}, expected {c.full} along dim {c.dim}")
        return t.narrow(c.dim, c.start, c.length).contiguous()
    total = sum(c.full for c in cuts)
    if t.dim() != 2 or t.shape[0] != total:
        raise CorruptCheckpoint(f"tensor {name} is {list(t.shape)}, expected {total} rows")
    pieces, offset = [], 0
    for c in cuts:
        pieces.append(t.narrow(0, offset + c.start, c.length))
        offset += c.full
    return torch.cat(pieces)


def _return_free_heap() -> None:
    """Give the layer's freed temporaries back to the OS (glibc): layers differ in size, so without
    this the heap fragments and resident memory creeps far above the quantized weights."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def read_tensor(entry: TensorEntry) -> torch.Tensor:
    """One checkpoint tensor into fresh CPU memory (read(2), no map kept)."""
    out = torch.empty(entry.shape, dtype=entry.dtype)
    if entry.numel:
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        with Path(entry.file).open("rb", buffering=0) as f:
            f.seek(entry.offset)
            done = 0
            while done < entry.nbytes:
                n = f.readinto(view[done:])
                if not n:
                    raise CorruptCheckpoint(f"{entry.file}: tensor {entry.name!r} ends early")
                done += n
    return out


def _set_module(network: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(network.get_submodule(parent) if parent else network, child, module)
